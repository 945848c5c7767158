"""Training checkpoints: atomic writes, RNG states as plain tensors, and finding the latest valid one.

A checkpoint is a dict that torch.load(weights_only=True) reads back:

    model, ema        state_dicts of the raw model (upstream key layout, no "module." prefix)
    opt               the AdamW state_dict
    args              the run's resolved arguments, a plain dict
    step, epoch       optimizer steps taken; the epoch the next step belongs to
    step_in_epoch     steps already taken in that epoch (the data position)
    data              {"seed", "num_samples", "global_batch_size", "world_size", "source"}: what fixes the
                      order, and what the run read
    rng               one dict per rank: {"torch", "cuda", "numpy", "python"} (see capture_rng_state)
    nonfinite_skipped steps skipped by --skip-nonfinite so far
    arithmetic        {"precision", "attention", "fused kernels", "compile"} as resolved on the run's device,
                      and under sdpa attention SIT_FAST_SDPA_BACKEND's value ("unset" where it is not set)
    wandb_id          the run's wandb run id (None without --wandb), which a resume continues
    model_config      {"model", "input_size", "in_channels", "num_classes", "learn_sigma", "latent_space"}:
                      what a sampler needs to rebuild the model (latent_space: a VAE spec or "pixels")
    version           CHECKPOINT_VERSION
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import re
import signal
import threading
import time
import zipfile

import numpy as np
import torch

from sit_fast import files
from sit_fast.checkpoint import (CheckpointError, check_checkpoint_file, check_not_cut_short, is_safetensors,
                                 safe_torch_load)
from sit_fast.interrupts import catch_ctrl_c, catch_stop_signals, restore_handlers

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "step_in_epoch", "rng")
_NAME = re.compile(r"^(\d+)\.pt$")

logger = logging.getLogger("sit_fast.train")


@contextlib.contextmanager
def interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block ends, then hand it to the handler it was held from (by
    default, raise KeyboardInterrupt): a checkpoint being written is finished rather than abandoned.
    A StopRequest's handler gets every press held, each with the time it came, so two presses during
    a long write are still a second Ctrl-C. Only the main thread can hold signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    stop = getattr(previous, "__self__", None)
    stop = stop if isinstance(stop, StopRequest) else None
    clock = stop.clock if stop is not None else time.monotonic
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(clock()))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not received:
        return
    if stop is not None:
        for when in received:
            stop.interrupt_at(when)
    elif callable(previous):
        previous(signal.SIGINT, None)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


INTERRUPT_GRACE = 1.0  # seconds within which another SIGINT is the same Ctrl-C (a double press, or a
# launcher that shares the terminal's process group and passes the signal on as well)


class StopRequest:
    """SIGTERM (a scheduler's preemption or time limit, `kill`, torchrun passing its own on), SIGUSR1
    (SLURM's `--signal=USR1@SECONDS` warning) or SIGHUP (the terminal closed, a dropped ssh session)
    asks the run to stop after the current step, with a checkpoint, instead of dying with everything
    since the last one; a signal the process started out ignoring stays ignored (SIGHUP under nohup).
    Once training runs (catch_interrupt), so does a first Ctrl-C; a second one, from INTERRUPT_GRACE
    seconds after the first, stops at once (KeyboardInterrupt). Under torchrun, Ctrl-C goes to
    torchrun, which passes it on once (each worker runs in a session of its own) and kills the
    workers 30 s later; a second press does not reach them.

    Under DDP all ranks must stop after the same step. Each step, every rank posts its flag (the
    signal number, or 0) to an all-reduce (MAX) on a CPU gloo group and reads the previous step's
    result: the ranks agree one step after the signal, with no GPU synchronisation.
    """

    def __init__(self):
        self.received = 0
        self.group = None
        self.flag = torch.zeros(1, dtype=torch.int64)
        self.pending = None
        self.previous = {}
        self.interrupted_at = None
        self.clock = time.monotonic

    def connect(self) -> None:
        """Join the ranks' agreement: a CPU (gloo) group of all ranks; call on every rank, once."""
        import torch.distributed as dist

        if self.group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def install(self) -> None:
        """Catch the stop signals (main thread only; elsewhere they keep their handlers), except those
        ignored (nohup ignores SIGHUP: the run goes on when the terminal closes). A signal caught
        before training starts stops the run after its first step (under DDP, the step the ranks agree on)."""
        catch_stop_signals(self._handle, self.previous)

    def catch_interrupt(self) -> None:
        """From here on, Ctrl-C stops after the current step with a checkpoint (main thread only). A
        process that started out ignoring SIGINT (a shell script's `train.py &`) goes on ignoring it."""
        catch_ctrl_c(self._interrupt, self.previous)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def _interrupt(self, signum, frame) -> None:
        self.interrupt_at(self.clock())

    def interrupt_at(self, when: float) -> None:
        """A Ctrl-C that came at `when` (self.clock's time): the first asks for a stop, one from
        INTERRUPT_GRACE seconds later raises KeyboardInterrupt, one in between is the same press."""
        if self.interrupted_at is None:
            self.interrupted_at = when
            self._handle(signal.SIGINT, None)
            if os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine; unbuffered, safe mid-print
                again = ("torchrun ends the workers 30 s after its Ctrl-C" if "TORCHELASTIC_RUN_ID" in os.environ
                         else "Ctrl-C again to stop at once")
                with contextlib.suppress(OSError):  # a console that went away
                    os.write(2, f"\nCtrl-C: stopping after this step with a checkpoint ({again})\n".encode())
        elif when - self.interrupted_at >= INTERRUPT_GRACE:
            raise KeyboardInterrupt

    def restore(self, handlers: bool = True, ctrl_c: bool = False) -> None:
        """The handlers as they were (handlers=False: kept for now; ctrl_c: Ctrl-C's alone put back); waits
        for a flag exchange still in flight (one a peer's end cut short is dropped: the run is ending, and
        the error that ends it is said elsewhere)."""
        if handlers:
            restore_handlers(self.previous)
        elif ctrl_c and signal.SIGINT in self.previous:
            signal.signal(signal.SIGINT, self.previous.pop(signal.SIGINT))
        pending, self.pending = self.pending, None
        if pending is not None:
            with contextlib.suppress(RuntimeError):
                pending.wait()

    def agreed(self) -> str | None:
        """Once per step on every rank: the signal's name when all ranks stop now, else None."""
        if self.group is None:
            return signal.Signals(self.received).name if self.received else None
        import torch.distributed as dist

        if self.pending is not None:
            self.pending.wait()  # a CPU collective posted a step ago: done by now, or nearly
            self.pending = None
            if int(self.flag) > 0:
                return signal.Signals(int(self.flag)).name
        self.flag.fill_(self.received)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return None


def capture_rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))


def checkpoint_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"{step:07d}.pt")


def checkpoint_bytes(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                     world_size: int) -> int:
    """About the bytes a checkpoint of this run takes on disk, a little more rather than less: the
    tensors of the model, the EMA and the optimizer state (AdamW's, which its first step creates, counted
    before then: two moments of each parameter's size and a step count), a margin for each tensor's
    record in the file, the ranks' RNG states and the rest."""
    tensors = [*model.state_dict().values(), *ema.state_dict().values()]
    total, count = 0, 0
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state.get(param)
            if state:
                tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
            else:  # AdamW's exp_avg and exp_avg_sq, and its step
                total, count = total + 2 * param.nelement() * param.element_size() + 8, count + 3
    total += sum(t.nelement() * t.element_size() for t in tensors)
    count += len(tensors)
    return total + 1024 * count + 64 * 1024 * world_size + 2**20


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    """Checkpoint files NNNNNNN.pt in `checkpoint_dir`, newest (highest step) first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    named = [(int(m.group(1)), os.path.join(checkpoint_dir, name))
             for name in os.listdir(checkpoint_dir) if (m := _NAME.match(name))]
    return [path for _, path in sorted(named, reverse=True)]


def checkpoints_past_keep(checkpoint_dir: str, step: int, keep: int, keep_every: int | None = None) -> list[str]:
    """--ckpt-keep: once the checkpoint of `step` is written whole, the checkpoints of `checkpoint_dir`
    to delete: those below `step` past the newest `keep` of those at `step` or below, but for the
    milestones, at the multiples of `keep_every`. Those of higher steps (which a branch from an older
    checkpoint has set aside before it writes) are left alone, and so is any file of `step` itself (the
    one just written, and a copy such as 12.pt beside 0000012.pt)."""
    steps = [(int(_NAME.match(os.path.basename(path)).group(1)), path) for path in list_checkpoints(checkpoint_dir)]
    upto = [(at, path) for at, path in steps if at <= step]
    return [path for at, path in upto[keep:] if at < step and (keep_every is None or at % keep_every)]


def unfinished_writes(checkpoint_dir: str, lock: files.FolderLock | None = None) -> str | None:
    """The line on the temporary files of checkpoint writes that never finished (removed where the
    run's `lock` is held), or None."""
    return files.unfinished_writes(checkpoint_dir, r"\d+\.pt", "checkpoint", "a run", lock)


def load_training_checkpoint(path: str) -> dict:
    """Read a train.py checkpoint (weights_only, memory-mapped); CheckpointError if it is not one."""
    check_checkpoint_file(path)
    if not zipfile.is_zipfile(path):
        if is_safetensors(path):
            raise CheckpointError(f"{path} is a .safetensors file of weights alone, not a resumable train.py "
                                  f"checkpoint (use --ckpt to start from its weights instead)")
        check_not_cut_short(path)
        raise CheckpointError(f"cannot read checkpoint {path}: not the zip archive that torch.save writes "
                              f"(corrupt or truncated file?)")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a train.py checkpoint (it holds a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a resumable train.py checkpoint: no {', '.join(missing)} "
                              f"(use --ckpt to start from its weights instead)")
    damaged = [key for key, ok in _ENTRY_CHECKS.items() if key in ckpt and not ok(ckpt[key])]
    if damaged:
        raise CheckpointError(f"{path} is not a resumable train.py checkpoint: damaged {', '.join(damaged)} "
                              f"(another valid checkpoint of the run, or --ckpt to start from its weights)")
    return ckpt


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What a train.py checkpoint's entries must be for a resume to use them.
_ENTRY_CHECKS = {
    "model": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    "ema": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    "opt": lambda v: (isinstance(v, dict) and isinstance(v.get("state"), dict)
                      and isinstance(v.get("param_groups"), list)),
    "args": lambda v: isinstance(v, dict) and _is_count(v.get("global_batch_size", 1))
    and _is_count(v.get("grad_accum_steps", 1)) and v.get("grad_accum_steps", 1) >= 1
    and isinstance(v.get("lr", 1.0), (int, float)),
    "step": _is_count, "epoch": _is_count, "step_in_epoch": _is_count,
    "rng": lambda v: isinstance(v, list) and all(
        isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) and r["torch"].dtype == torch.uint8
        for r in v),
    "data": lambda v: isinstance(v, dict),
}


def find_latest_valid(checkpoint_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint in `checkpoint_dir` that loads, with its contents; None if there is none.

    Unreadable ones (a crash while copying, a full disk) are skipped with a warning naming them.
    """
    for path in list_checkpoints(checkpoint_dir):
        try:
            return path, load_training_checkpoint(path)
        except CheckpointError as err:
            logger.warning("skipping %s: %s", path, err)
    return None


def experiment_dirs(results_dir: str, suffix: str) -> list[str]:
    """Experiment directories NNN-<suffix> in results_dir, newest (highest index) first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(results_dir), f"*-{glob.escape(suffix)}")):
        index = os.path.basename(path).split("-", 1)[0]
        if index.isdigit() and os.path.isdir(path):
            found.append((int(index), path))
    return [path for _, path in sorted(found, reverse=True)]
