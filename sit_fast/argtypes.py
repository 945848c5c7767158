"""argparse types shared by the command lines: a bad value is refused with the flag's name and why."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys

from sit_fast.errors import UserError


_DEFAULT_SUFFIX = " (default: %(default)s)"  # what Python < 3.11 BooleanOptionalAction adds to its help


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default, unless it is None or False (no value, an off switch) or the
    help text already speaks of it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action, argparse.BooleanOptionalAction) and text.endswith(_DEFAULT_SUFFIX):
            text = text[: -len(_DEFAULT_SUFFIX)]
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text or not action.option_strings:
            return text
        return text + _DEFAULT_SUFFIX


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flags, bad choices) become UserError: one line, exit status 2.
    --help shows the defaults (DefaultsHelpFormatter), also in its subcommands' parsers. Flags are
    taken spelled out only: a shortened one is an error, not a guess at which flag it meant."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        self.refuse_two_names_of_one_flag(list(sys.argv[1:] if args is None else args))
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # the help to see is the chosen subcommand's (sample.py ODE --help), which lists its flags
            parser, siblings = self, {}
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction) and getattr(namespace, action.dest, None):
                    chosen = getattr(namespace, action.dest)
                    parser, siblings = action.choices[chosen], {k: v for k, v in action.choices.items() if k != chosen}
            # flags a parser takes but leaves out of its --help (sample_ddp.py's of other jobs) are not offered
            flags = [flag for action in parser._actions if action.help != argparse.SUPPRESS
                     for flag in action.option_strings]
            for name, other in siblings.items():  # a flag of another subcommand: say whose (sample.py SDE --atol)
                theirs = [extra for extra in extras if extra.split("=")[0] in other._option_string_actions
                          and other._option_string_actions[extra.split("=")[0]].help != argparse.SUPPRESS]
                if theirs:
                    flag = theirs[0].split("=")[0]
                    raise UserError(f"{flag} is a flag of {other.prog}, not of {parser.prog}: drop it, or run "
                                    f"{other.prog}")
            guesses = [flag_meant(extra.split("=")[0], flags) for extra in extras if extra.startswith("--")]
            meant = ", ".join(dict.fromkeys(flag for guess in guesses for flag in guess))
            hint = f"did you mean {meant}? " if meant else ""
            raise UserError(f"unrecognized arguments: {' '.join(extras)} ({hint}see {parser.prog} --help)")
        return namespace

    def refuse_two_names_of_one_flag(self, args: list) -> None:
        """A flag given under two of its names (--global-seed 3 --seed 4) is refused: which one was meant
        is not clear, where one name given twice is the usual last-wins override. A switch and its --no-
        form are one name each way and are left to that rule."""
        commands = {name: sub for action in self._actions if isinstance(action, argparse._SubParsersAction)
                    for name, sub in action.choices.items()}
        parsers, first_name = [self], {}
        for token in map(str, args):
            if token == "--":  # what follows is values only
                break
            if token in commands and len(parsers) == 1:  # the subcommand: its parser reads what follows
                parsers.append(commands[token])
            name = token.split("=", 1)[0]
            for parser in parsers if token.startswith("--") else ():
                action = parser._option_string_actions.get(name)
                if action is None or isinstance(action, argparse.BooleanOptionalAction):
                    continue
                first = first_name.setdefault(id(action), name)
                if first != name:
                    raise UserError(f"{first} and {name} are two names of one flag: give it once "
                                    f"(see {parser.prog} --help)")


def flag_meant(given: str, flags: list[str], most: int = 3) -> list[str]:
    """The flags an unknown one may mean: those it begins (a shortened flag, which upstream's argparse
    took: --cfg for --cfg-scale), up to `most` of them, else the one closest in spelling (a typo), or
    none when none is close."""
    shortened = [flag for flag in flags if flag.startswith(given) and flag != given]
    if shortened:
        return shortened[:most] if len(shortened) <= most else [*shortened[:most], "..."]
    return difflib.get_close_matches(given, flags, n=1, cutoff=0.75)


def doc_paragraph(doc: str | None, index: int = 0) -> str | None:
    """Paragraph `index` of a module's docstring, for its --help's description; None under python -OO,
    which drops docstrings (the help then has none)."""
    return doc.split("\n\n")[index] if doc else None


def default_workers(most: int = 4) -> int:
    """Data-loader workers by default: `most` (upstream's 4), or the CPUs this process may use if
    fewer (more would only contend, and PyTorch warns)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(most, usable))


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None


def integer(value: str, least: int | None = None, below: str = "") -> int:
    """An integer torch can hold (int64): a larger count or size was a traceback from deep inside torch
    ("Overflow when unpacking long long"), after the model and the data had loaded. `least`: a narrower
    range's lower end, and `below` how the message names that range to a value under it."""
    number = _int(value)
    if least is None and not -2**63 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer between -2**63 and 2**63 - 1, got {value}")
    if least is not None and number < least:
        raise argparse.ArgumentTypeError(f"must be {below}, got {value}")
    if number >= 2**63:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {value}")
    return number


def nonempty(value: str) -> str:
    """A path or name that is not empty: an empty one (a shell variable left unset, `--exp-dir "$EXP"`)
    names nothing, and would read as the flag not given."""
    if not value:
        raise argparse.ArgumentTypeError("must be a path or a name, got an empty string (an unset shell variable?)")
    return value


def user_path(value: str) -> str:
    """A path (or a name, where a flag takes either), not empty, with a leading ~ or ~user expanded to
    that home folder, as the shell expands it unquoted: `--sample-dir '~/samples'` (quoted, or after
    an =) means the home folder's samples/, not a folder named ~ in the working folder."""
    return os.path.expanduser(nonempty(value))


def torch_device(value: str) -> str:
    """cpu, cuda or cuda:N, of a device this machine has."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: this machine has no CUDA device PyTorch can use (cpu runs here)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return value


def random_seed(value: str) -> int:
    """A seed: an integer of at most 63 bits and a sign, so that no two seeds give one generator state
    (torch takes seeds modulo 2**64: 2**64 would be seed 0)."""
    number = _int(value)
    if not -2**63 < number < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer between -(2**63 - 1) and 2**63 - 1, got {value}")
    return number


def real(value: str) -> float:
    """The number; -0 is 0 (as a value it is, and as a name: --cfg-scale -0 named its FID folder cfg--0.0,
    another folder than --cfg-scale 0's)."""
    try:
        return float(value) + 0.0  # -0.0 + 0.0 == +0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None


def positive_int(value: str) -> int:
    return integer(value, 1, "a positive integer")


def nonnegative_int(value: str) -> int:
    return integer(value, 0, "0 or more")


def positive_float(value: str) -> float:
    number = real(value)
    if not 0 < number < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def finite_float(value: str) -> float:
    number = real(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def nonnegative_float(value: str) -> float:
    number = real(value)
    if not 0 <= number < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {value}")
    return number


def fraction(value: str) -> float:
    """A number in [0, 1]."""
    number = real(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def or_none(convert):
    """The type `convert`, or None for "none" (any case): a way to unset, on resume, what a run had set."""
    def parse(value: str):
        if value.lower() == "none":
            return None
        try:
            return convert(value)
        except argparse.ArgumentTypeError as error:  # "must be X, got V" -> "must be X or none, got V"
            wanted, got, value_given = str(error).partition(", got ")
            raise argparse.ArgumentTypeError(f"{wanted} or none{got}{value_given}") from None

    parse.__name__ = f"{convert.__name__} or none"
    return parse


def end_margin(value: str) -> float:
    """A distance kept from each end of [0, 1]: a number in [0, 0.5)."""
    number = real(value)
    if not 0 <= number < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return number


def fraction_below_one(value: str) -> float:
    """A number in [0, 1)."""
    number = real(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number
