"""The documents and messages name only flags that exist: every `--flag` in README.md, USAGE.md and
the strings of the code (its messages, help and docstrings) is an option of one of this project's
command lines, or of torchrun's (a flag renamed or removed in the code, and left in a text that tells
a user what to pass, fails here)."""
import argparse
import ast
import glob
import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", "USAGE.md"]
SCRIPTS = ["train.py", "sample.py", "sample_ddp.py"]  # their module docstrings
# Words in the documents that look like flags of none of the command lines, and why they are there.
NOT_OURS = {
    "--global-batch": "README: a shortened flag, which train.py refuses",
    "--no-": "README: the prefix of the switches' negative forms",
    "--no-build-isolation": "pip's, to build flash-attn",
    "--nodes": "SLURM's srun",
    "--ntasks-per-node": "SLURM's srun",
    "--signal": "SLURM's #SBATCH",
}
# In the code's strings: other programs' flags, and examples.
NOT_OURS_IN_CODE = {
    "--benchmark-only": "pytest-benchmark's",
    "--cfg": "sit_fast/argtypes.py: a shortened flag, in flag_meant's docstring",
    "--flag": "sit_fast/training/loop.py: a placeholder, in a docstring",
    "--force-reinstall": "pip's, to mend flash-attn",
    "--format": "nvidia-smi's", "--query-gpu": "nvidia-smi's",
    "--porcelain": "git's", "--short": "git's", "--untracked-files": "git's",
}
# torchrun's flags of releases newer than some this project runs on (README says which take them).
NEWER_TORCHRUN = {"--signals-to-handle", "--shutdown-timeout"}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of a parser and of its sub-commands'."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser that `main` builds for itself, caught as it parses (nothing runs)."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)  # parse_args calls it
        with pytest.raises(_Parsed) as parsed:
            main([])
    return parsed.value.parser


@pytest.fixture(scope="module")
def known_flags():
    import sample
    from benchmarks import __main__ as benchmarks_main
    from benchmarks import kernels_suite, roofline
    from sit_fast import demo, export, latent_cache, memory, parity
    from sit_fast.training.args import build_parser as training_parser
    from torch.distributed.run import get_args_parser as torchrun_parser

    parsers = [sample.build_parser(), sample.build_parser(sample.SAMPLE_DDP_DEFAULTS, "sample_ddp.py"),
               training_parser(), export.build_parser(), demo.build_parser(), latent_cache.build_parser(),
               torchrun_parser()]
    monkeypatch = pytest.MonkeyPatch()
    try:
        parsers += [_parser_of(main, monkeypatch) for main in (parity.main, memory.main, roofline.main,
                                                                kernels_suite.main, benchmarks_main.parse_args)]
    finally:
        monkeypatch.undo()
    flags = set().union(*(_options(parser) for parser in parsers))
    with open(os.path.join(REPO_ROOT, "tests", "headroom.py"), encoding="utf-8") as f:  # pytest's, of the suite
        flags |= set(re.findall(r'addoption\("(--[\w-]+)"', f.read()))
    return flags


def _texts():
    for name in DOCUMENTS:
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
            yield name, f.read()
    for name in SCRIPTS:
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
            yield name, ast.get_docstring(ast.parse(f.read())) or ""


def test_the_documents_name_only_flags_that_exist(known_flags):
    unknown = {}
    for name, text in _texts():
        for flag in FLAG.findall(text):
            if flag not in known_flags and flag not in NOT_OURS and flag not in NEWER_TORCHRUN:
                unknown.setdefault(flag, name)
    assert not unknown, f"flags the documents name that no command line has: {unknown}"


def _code_strings():
    """(file:line, string) of every string constant (an f-string's literal parts included) of the code."""
    files = ["train.py", "sample.py", "sample_ddp.py", "setup.py"] + [
        os.path.relpath(path, REPO_ROOT) for folder in ("sit_fast", "kernels", "benchmarks")
        for path in glob.glob(os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True)]
    for name in sorted(files):
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield f"{name}:{node.lineno}", node.value


def test_the_codes_messages_name_only_flags_that_exist(known_flags):
    allowed = known_flags | set(NOT_OURS) | NEWER_TORCHRUN | set(NOT_OURS_IN_CODE)
    unknown = {}
    for where, text in _code_strings():
        for flag in FLAG.findall(text):
            if flag not in allowed:
                unknown.setdefault(flag, where)
    assert not unknown, f"flags the code's strings name that no command line has: {unknown}"


def test_the_list_of_other_words_holds_only_words_in_use(known_flags):
    """An entry of NOT_OURS (or NEWER_TORCHRUN) that the documents dropped, or that became a flag of ours,
    goes."""
    used = {flag for _, text in _texts() for flag in FLAG.findall(text)}
    in_code = {flag for _, text in _code_strings() for flag in FLAG.findall(text)}
    assert set(NOT_OURS_IN_CODE) <= in_code and not set(NOT_OURS_IN_CODE) & known_flags, (
        set(NOT_OURS_IN_CODE) - in_code, set(NOT_OURS_IN_CODE) & known_flags)
    assert set(NOT_OURS) | NEWER_TORCHRUN <= used and not set(NOT_OURS) & known_flags, (set(NOT_OURS) - used,
                                                                        set(NOT_OURS) & known_flags)
    # the check sees a parser's flags: a few of each command line's
    assert {"--ckpt", "--per-proc-batch-size", "--latent-cache", "--verify", "--gpu-gib", "--results",
            "--nproc_per_node", "--headroom-out"} <= known_flags
