"""The training run: setup, the step loop, logging, sample grids and checkpoints.

Hot-loop rules: no host-device synchronisation per step. The loss and the non-finite flags are
accumulated on the device and read (all-reduced) only at log and checkpoint steps; the EMA is one
fused _foreach_lerp_ on the device; the optimizer is AdamW(fused=True) on CUDA, which also skips a
step with non-finite gradients (--skip-nonfinite) on the device.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import logging.handlers
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Collection
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sit_fast import flops
from sit_fast.attention import sdpa_arithmetic, select_backend
from sit_fast.checkpoint import (
    CheckpointError, infer_config, load_into_model, read_checkpoint, recorded_model_config,
)
from sit_fast.data import (EpochSampler, LatentCacheDataset, RunBatches, build_dataset, close_loader,
                           data_fingerprint, make_loader, worker_error)
from sit_fast.distributed import (
    DistInfo, agree, barrier, broadcast_object, check_same_file, cleanup, gather_object, init_distributed,
    is_distributed, local_path_on_main_first, on_main, peer_ended, peer_failed, unshared_path,
)
from sit_fast.errors import (
    PeerFailed, UserError, allocation_past_device, amount, first_line, is_out_of_memory, memory_kind,
)
from sit_fast.files import (WRITE_REFUSED, FileLock, FolderLock, atomic_torch_save, atomic_write,
                             first_missing_folder, is_inside, make_folder, make_room, make_writable_folder, refusal,
                             remove_empty_folders, remove_locked_folder)
from sit_fast.interrupts import ignore_stop_signals, start_resource_tracker, stop_signals_held
from sit_fast.models import SiT_models, fused_kernels_flag, model_config, registry_name
from sit_fast.progress import duration
from sit_fast.sampling import check_training_args, default_cfg_channels, release_or_path
from sit_fast.training.args import merge_resumed_args, parse_args, train_eps_of_a_new_run
from sit_fast.training.checkpointing import (
    CHECKPOINT_VERSION, StopRequest, capture_rng_state, checkpoint_bytes, checkpoint_path, checkpoints_past_keep,
    experiment_dirs, find_latest_valid, interrupt_after, list_checkpoints, load_training_checkpoint,
    restore_rng_state, unfinished_writes,
)
from sit_fast.transport import Sampler, create_transport, in_flag_words
from sit_fast.vae import LatentCodec, recorded_vae_spec, same_encoder

logger = logging.getLogger("sit_fast.train")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# --skip-nonfinite gives up when the log lines' windows of this many steps in a row were all skipped: a
# run whose every step is non-finite has diverged, and would only spend its GPUs to the end
SKIPPED_IN_A_ROW_LIMIT = 100

# The flags that only the EMA sample grids read: given with --sample-every none, they change nothing.
GRID_FLAGS = ("cfg_scale", "sample_method", "sample_steps", "num_sample_images", "sample_eps")


#################################################################################
#                                  Setup helpers                                #
#################################################################################

def experiment_suffix(args: argparse.Namespace) -> str:
    return f"{args.model.replace('/', '-')}-{args.path_type}-{args.prediction}-{args.loss_weight}"


def new_experiment_dir(args: argparse.Namespace) -> str:
    """--exp-dir, or RESULTS_DIR/NNN-<model>-<path>-<prediction>-<loss weight>, numbered as upstream (000,
    001, ...) but after the highest number there, so that a folder removed never gets its number reused
    by a run that would then write into the next one's folder. The numbered folder is made here, by a
    call that fails where it exists: two runs started together (a job array) take two numbers rather
    than both writing into one folder."""
    if args.exp_dir:
        return args.exp_dir
    make_folder(args.results_dir, f"--results-dir {args.results_dir}")
    numbers = [int(match.group(1)) for name in os.listdir(args.results_dir)
               if (match := re.match(r"(\d+)-", name))]
    n = max(numbers, default=-1) + 1
    while True:
        path = os.path.join(args.results_dir, f"{n:03d}-{experiment_suffix(args)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # another run took it since the listing
            n += 1
        except OSError as err:
            raise UserError(f"--results-dir {args.results_dir}: cannot create the folder {path} "
                            f"({err.strerror or err}): pass a folder that can be written") from None


def other_runs(results_dir: str, suffix: str) -> list[str]:
    """Names of the run folders NNN-<other suffix> in results_dir that hold checkpoints, newest first:
    what --resume auto did not look at (another --model or transport)."""
    if not os.path.isdir(results_dir):
        return []
    names = [name for name in os.listdir(results_dir)
             if re.match(r"\d+-", name) and not name.endswith(f"-{suffix}")
             and list_checkpoints(os.path.join(results_dir, name, "checkpoints"))]
    return sorted(names, key=lambda name: int(name.split("-", 1)[0]), reverse=True)


# Flags that tell one experiment from another of the same --model and transport: --resume auto without
# --exp-dir continues a run only where those given are the ones it recorded. (Not the data's paths: a
# requeued job may copy its data to a scratch folder of its own.)
EXPERIMENT_FLAGS = ("dataset", "global_batch_size", "global_seed", "lr", "ema_decay", "grad_clip")
EXPERIMENT_RECORD = "experiment.json"  # EXP/experiment.json: a new run's EXPERIMENT_FLAGS, before its first checkpoint


def experiment_differences(args: argparse.Namespace, explicit: set[str], saved: dict) -> list[str]:
    """The EXPERIMENT_FLAGS given (explicit) whose values are not those a run recorded (its checkpoint's
    arguments, or its EXPERIMENT_RECORD), as "--flag RECORDED (this command: VALUE)"."""
    return [f"--{key.replace('_', '-')} {saved[key]} (this command: {getattr(args, key)})"
            for key in EXPERIMENT_FLAGS if key in explicit and key in saved and getattr(args, key) != saved[key]]


def recorded_experiment(run: str) -> dict | None:
    """The EXPERIMENT_RECORD of a run folder, None where there is none (or it cannot be read)."""
    try:
        with open(os.path.join(run, EXPERIMENT_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_outside_the_images(args: argparse.Namespace) -> None:
    """--exp-dir (or --results-dir) outside the image folder it trains on: inside, the run's folders
    would be read as classes of the dataset the next time (its checkpoints folder a class of no images)."""
    if args.dataset != "imagefolder" or args.latent_cache is not None or not args.data_path:
        return
    flag, where = ("--exp-dir", args.exp_dir) if args.exp_dir else ("--results-dir", args.results_dir)
    if is_inside(where, args.data_path):
        raise UserError(f"{flag} {where} is inside --data-path {args.data_path}: put the run elsewhere (in the "
                        f"dataset's folder its folders would be read as classes the next time)")


def select_experiment(args: argparse.Namespace, explicit: set[str] = frozenset()
                      ) -> tuple[str, str | None, str, bool]:
    """(experiment dir, checkpoint to resume or None, a sentence saying what was chosen, whether the
    dir was made here: a new numbered folder). Rank 0 only. explicit: the flags given."""
    if args.resume is None:
        exp_dir = new_experiment_dir(args)
        existing = list_checkpoints(os.path.join(exp_dir, "checkpoints"))
        if existing:  # a new run would overwrite them step by step and leave the later ones to --resume auto
            raise UserError(f"--exp-dir {exp_dir} holds the checkpoints of a run (the latest: "
                            f"{os.path.basename(existing[0])}): continue it with --resume auto, or start a new run "
                            f"in another --exp-dir")
        return exp_dir, None, f"new run in {exp_dir}", not args.exp_dir
    if args.resume == "auto":
        # The newest run of this --model and transport (and, without --exp-dir, of this experiment: the
        # EXPERIMENT_FLAGS given) only: an older one may be finished; the newest without a checkpoint (it
        # failed before its first) means a new run.
        runs = [args.exp_dir] if args.exp_dir else experiment_dirs(args.results_dir, experiment_suffix(args))
        skipped, last = [], len(runs)  # newer runs of other experiments; the run that stopped the search
        for index, run in enumerate(runs):
            found = find_latest_valid(os.path.join(run, "checkpoints"))
            if found is None and (damaged := list_checkpoints(os.path.join(run, "checkpoints"))):
                # A read error of the moment (a network filesystem's, say) must not restart the run from
                # step 0, nor (with --exp-dir) let a new run overwrite checkpoints that load again later.
                raise CheckpointError(f"--resume auto: no checkpoint of {run} loads ({len(damaged)} found; see "
                                      f"the warnings above): mend or move them aside, resume another with "
                                      f"--resume PATH, or start a new run in another --exp-dir")
            saved = found[1].get("args", {}) if found is not None else recorded_experiment(run) or {}
            differences = [] if args.exp_dir else experiment_differences(args, explicit, saved)
            if differences:
                skipped.append(f"{os.path.basename(run)} ({', '.join(differences)}"
                               f"{'' if found is not None else '; no checkpoint yet'})")
                continue
            if found is None:
                if not args.exp_dir and (holder := training_elsewhere(run)) is not None:
                    # not a run that failed before its first checkpoint: one that has not reached it yet (the same
                    # job started twice), which a new run beside it would duplicate, and --resume auto then follow
                    raise UserError(f"--resume auto: the newest {experiment_suffix(args)} run in {args.results_dir}, "
                                    f"{os.path.basename(run)}, has no checkpoint yet and another job is training "
                                    f"into it now ({holder}): wait for that job to end, or start a run of its own "
                                    f"without --resume")
                last = index
                break
            left = f"; newer runs of other experiments left alone: {'; '.join(skipped)}" if skipped else ""
            return run, found[0], f"--resume auto: resuming from {found[0]} (the latest valid checkpoint{left})", False
        suffix = experiment_suffix(args)
        if args.exp_dir:
            where = f"no valid checkpoint of {args.exp_dir}"
        elif last < len(runs):
            where = (f"no valid checkpoint of the newest {suffix} run{' of this experiment' if skipped else ''} in "
                     f"{args.results_dir}, {os.path.basename(runs[last])}")
        else:
            where = (f"no valid checkpoint of a {suffix} run{' of this experiment' if skipped else ''} in "
                     f"{args.results_dir}")
        if skipped:
            where += (f" (newer runs of other experiments, left alone: {'; '.join(skipped)}; to continue one with this "
                      f"command's flags, pass its folder as --exp-dir with --resume auto)")
        older = [os.path.basename(run) for run in runs[last + 1:]
                 if list_checkpoints(os.path.join(run, "checkpoints"))]
        others = [] if args.exp_dir else other_runs(args.results_dir, experiment_suffix(args))
        exp_dir = new_experiment_dir(args)
        hint = ""
        if older:
            listed = ", ".join(older[:3]) + (" and more" if len(older) > 3 else "")
            hint = (f" (older runs of it hold checkpoints: {listed}; to continue one, pass its folder as --exp-dir "
                    f"with --resume auto)")
        elif others:
            hint = (f" ({args.results_dir} holds other runs with checkpoints: {', '.join(others[:3])}"
                    f"{' and more' if len(others) > 3 else ''}; to continue one, pass its --model and transport flags, "
                    f"or --exp-dir)")
        return exp_dir, None, f"--resume auto: {where}; new run in {exp_dir}{hint}", not args.exp_dir
    path = args.resume
    if os.path.isdir(path):
        ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        found = find_latest_valid(ckpt_dir)
        if found is None:
            why = ("each failed to load: see the warnings above" if list_checkpoints(ckpt_dir) else
                   "it holds no NNNNNNN.pt file")
            raise CheckpointError(f"--resume {path}: no valid checkpoint in {ckpt_dir} ({why}): pass another "
                                  f"checkpoint or run folder, or start a new run without --resume")
        path = found[0]
        saved = found[1].get("args", {})
    else:
        saved = load_training_checkpoint(path).get("args", {})  # a one-line error for a missing or damaged file
    ckpt_dir = os.path.dirname(os.path.abspath(path))
    folder, parent = os.path.basename(ckpt_dir), os.path.dirname(ckpt_dir)
    superseded = folder.startswith("superseded-") and os.path.basename(parent) == "checkpoints"
    if not os.path.isdir(args.resume) and folder != "checkpoints" and not superseded and not args.exp_dir:
        # A file outside a run folder (a copy, a download): the run goes on in a new folder of --results-dir,
        # named by the checkpoint's model and transport (a different one given is refused later).
        naming = {key: saved[key] for key in ("model", "path_type", "prediction", "loss_weight") if key in saved}
        exp_dir = new_experiment_dir(argparse.Namespace(**{**vars(args), **naming}))
        return (exp_dir, path, f"resuming from {path}, a checkpoint outside a run folder: the run goes on in "
                f"{exp_dir}", True)
    # EXP/checkpoints/NNNNNNN.pt and EXP/checkpoints/superseded-<time>/NNNNNNN.pt go on in EXP
    run_dir = os.path.dirname(parent) if superseded else parent if folder == "checkpoints" else ckpt_dir
    exp_dir = args.exp_dir or run_dir
    own = os.path.abspath(os.path.join(exp_dir, "checkpoints"))
    existing = list_checkpoints(own)
    if existing and superseded and os.path.realpath(exp_dir) == os.path.realpath(run_dir):
        raise UserError(f"--resume {path}: that checkpoint is of a branch set aside in {exp_dir}, whose current "
                        f"checkpoints (the latest: {os.path.basename(existing[0])}) would be overwritten: resume it "
                        f"into another --exp-dir")
    if existing and os.path.realpath(own) != os.path.realpath(ckpt_dir):  # not its own: it would overwrite them
        raise UserError(f"--resume {path}: the run goes on in {exp_dir}, whose checkpoints are not that one's (the "
                        f"latest: {os.path.basename(existing[0])}) and would be overwritten: resume into another "
                        f"--exp-dir, or continue those with --resume auto --exp-dir {exp_dir}")
    return exp_dir, path, f"resuming from {path}", False


def set_aside_later_checkpoints(resume_path: str, step: int, checkpoint_dir: str) -> str:
    """Resuming from a checkpoint older than the newest of the run's own checkpoint_dir starts a new
    branch: move the later ones into checkpoints/superseded-<time>/ (kept, but no longer found by
    --resume auto, and not overwritten by the new branch), and the sample grids of later steps into
    samples/superseded-<time>/. `step` is the resumed checkpoint's: the later ones are those of higher
    steps, whatever the resumed file's name or the path's spelling (a link in it). A checkpoint of
    another folder (--exp-dir elsewhere) moves nothing. Called once the resumed run is built, so a
    refused resume moves nothing. The grids move first: the later checkpoints are what says a branch
    is still to be set aside, so a process killed in between sets the rest aside when run again.
    Returns a line for the log ('' when nothing moved)."""
    resumed = os.path.abspath(resume_path)
    own = os.path.realpath(os.path.dirname(resumed)) == os.path.realpath(checkpoint_dir)
    later = [path for path in list_checkpoints(checkpoint_dir)  # newest first
             if own and int(os.path.splitext(os.path.basename(path))[0]) > step]
    if not later:
        return ""
    samples = os.path.join(os.path.dirname(checkpoint_dir), "samples")
    stamp = folder = time.strftime("superseded-%Y%m%d-%H%M%S")
    k = 1
    while os.path.exists(os.path.join(checkpoint_dir, folder)) or os.path.exists(os.path.join(samples, folder)):
        k += 1  # two branches in one second
        folder = f"{stamp}-{k}"
    grids = sorted(name for name in (os.listdir(samples) if os.path.isdir(samples) else [])
                   if re.fullmatch(r"\d+\.png", name) and int(name[:-4]) > step)
    aside = os.path.join(checkpoint_dir, folder)
    try:
        if grids:
            os.makedirs(os.path.join(samples, folder))
            for name in grids:
                os.replace(os.path.join(samples, name), os.path.join(samples, folder, name))
        os.makedirs(aside)
        for path in later:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    except OSError:  # a folder that nothing was moved into is not left behind for each retry
        for made in (os.path.join(samples, folder), aside):
            remove_empty_folders(made, made)
        raise
    names = ", ".join(os.path.basename(p) for p in reversed(later))
    line = (f"a new branch from {os.path.basename(resumed)}: the later checkpoints of that run ({names}) are moved "
            f"to {aside}")
    if grids:
        line += f", and its sample grids of later steps ({len(grids)}) to {os.path.join(samples, folder)}"
    return line


LOG_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def setup_logging(is_main: bool) -> None:
    """Rank 0: the run's lines and every sit_fast warning (data, checkpoints, attention) on the console,
    and kept until open_log_file names log.txt. Other ranks: nothing, since rank 0 says the same."""
    reset_logging()
    package = logging.getLogger("sit_fast")  # the parent of this module's logger
    package.propagate = False
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    if not is_main:
        package.addHandler(logging.NullHandler())
        package.setLevel(logging.ERROR)
        return
    package.setLevel(logging.INFO)
    stream = TqdmHandler()
    stream.setFormatter(LOG_FORMAT)
    package.addHandler(stream)
    package.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))


class LogFile(logging.FileHandler):
    """log.txt. A write that fails (a full disk) is said once on the console, not as logging's traceback
    for every line; the run goes on, its lines on the console, and its own errors (a checkpoint that
    cannot be written) are said as they would be."""

    failed = False

    def handleError(self, record):
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            self.say_once(err)
        else:
            super().handleError(record)

    def say_once(self, err: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(f"warning: cannot write {self.baseFilename} ({refusal(err)}): the run's lines go to the "
                  f"console alone", file=sys.stderr, flush=True)

    def close(self):
        try:
            super().close()  # flushes what is buffered
        except OSError as err:
            self.say_once(err)


def open_log_file(exp_dir: str) -> None:
    """Append to exp_dir/log.txt from here on, starting with the lines logged before it was known."""
    package = logging.getLogger("sit_fast")
    file_handler = LogFile(os.path.join(exp_dir, "log.txt"))
    file_handler.setFormatter(LOG_FORMAT)
    for handler in list(package.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(file_handler)
            handler.close()  # flushes into log.txt
            package.removeHandler(handler)
    package.addHandler(file_handler)


def reset_logging() -> None:
    """Close log.txt and hand sit_fast's messages back to Python's defaults, for whatever runs next in
    this process (a notebook, the tests)."""
    package = logging.getLogger("sit_fast")
    for handler in package.handlers:
        handler.close()
    package.handlers.clear()
    package.propagate = True
    package.setLevel(logging.NOTSET)


_run_lock: FolderLock | None = None


def hold_run_lock(exp_dir: str) -> None:
    """Lock the run folder (rank 0, until release_run_lock: main's end): a second job training into it
    now, the same job started twice or two resuming one run, is refused in one line naming the first,
    instead of writing over its checkpoints. A process holds one run's lock, taken again at no cost."""
    global _run_lock
    if _run_lock is not None:
        if _run_lock.fd is not None and os.path.realpath(_run_lock.folder) == os.path.realpath(exp_dir):
            return
        release_run_lock()
    _run_lock = FolderLock(exp_dir, "--exp-dir")
    _run_lock.acquire()


@contextlib.contextmanager
def choosing_a_run_folder(args: argparse.Namespace):
    """A new run or --resume auto in --results-dir: its folder chosen, or made, and locked (hold_run_lock)
    under a lock of the results folder (RESULTS_DIR/.runs.lock, there for moments), for which a job
    started at the same time waits. Two such jobs (the same job started twice) both started new runs
    where one listed the folder before the other had made its run folder, or before it held its lock:
    the second now finds the first's run, and is refused while it trains there, or resumes it."""
    if args.exp_dir or args.resume not in (None, "auto"):
        yield
        return
    make_writable_folder(args.results_dir, f"--results-dir {args.results_dir}")
    lock = FileLock(os.path.join(args.results_dir, "runs"), "--results-dir", guards=args.results_dir)
    lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def training_elsewhere(exp_dir: str) -> str | None:
    """Who trains into the run folder exp_dir now, when another job does (its lock's holder), else None."""
    if _run_lock is not None and _run_lock.fd is not None and os.path.realpath(_run_lock.folder) == \
            os.path.realpath(exp_dir):
        return None  # this process's own
    return FolderLock.holder(exp_dir)


def release_run_lock() -> None:
    global _run_lock
    if _run_lock is not None:
        _run_lock.release()
        _run_lock = None


def remove_unused_experiment(exp_dir: str, made_from: str | None) -> None:
    """Delete an experiment folder this run created, if it holds nothing but log.txt and no checkpoint,
    and the parents it created with it (`made_from` down: a new --results-dir) that are left empty. Its
    lock is held until its lock file goes, last: a job started on the folder meanwhile is refused, or
    finds it gone (released first, the lock let such a job in while the folder was being removed)."""
    package = logging.getLogger("sit_fast")
    for handler in list(package.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            package.removeHandler(handler)
    checkpoints = os.path.join(exp_dir, "checkpoints")
    unused = (set(os.listdir(exp_dir)) <= {"log.txt", "checkpoints", FolderLock.NAME, EXPERIMENT_RECORD}
              and not os.listdir(checkpoints))
    if unused:
        remove_locked_folder(exp_dir)
    release_run_lock()
    if unused:
        if made_from is not None:
            remove_empty_folders(os.path.dirname(os.path.abspath(exp_dir)), made_from)
        logger.info(f"removed {exp_dir}: the run did not start")


class TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar. A console that went away (a closed pipe, a
    terminal hung up) fails the line there only, as logging's own handlers do: log.txt keeps it and
    the run goes on."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 -- logging's convention: report through handleError, never raise
            self.handleError(record)


def check_trackers(args: argparse.Namespace, resumed_from: str | None = None, explicit: Collection[str] = ()) -> None:
    """--tensorboard / --wandb need their package: say so before anything is set up (one the run being
    resumed, resumed_from, had and this command does not give: that it is the run's, and how to go without)."""
    for flag, module, package in (("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                  ("wandb", "wandb", "wandb")):
        if getattr(args, flag):
            try:
                importlib.import_module(module)
            except ImportError as err:
                if resumed_from is not None and flag not in explicit:
                    raise UserError(f"the run being resumed ({resumed_from}) logs with --{flag}, which needs the "
                                    f"{package} package ({err}): pip install {package}, or pass --no-{flag} to go on "
                                    f"without it") from None
                raise UserError(f"--{flag} needs the {package} package ({err}): pip install {package}") from None


def log_to_file(message: str) -> None:
    """Append a line to log.txt only (the console gets it from the caller)."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger("sit_fast").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def configure_matmul(precision: str) -> None:
    torch.set_float32_matmul_precision("high" if precision in ("tf32", "bf16") else "highest")
    torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed % 2**64)  # torch takes 64-bit seeds, negative ones as seed + 2**64: the same for those
    np.random.seed(seed % 2**32)
    random.seed(seed)


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


#################################################################################
#                                   The run                                     #
#################################################################################

def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW runs fused (one kernel for all parameters) on this device: on CUDA."""
    return device.type == "cuda"


def total_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients, on the device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


class LogWindow:
    """The figures of one log line, gathered over the steps since the previous line.

    The loss and the gradient norm (before clipping) of each applied step are summed on the device
    (no host sync per step); `steps` counts every step, applied or skipped, and `applied` the applied
    ones, which is the same count on every rank (DDP gives every rank the same gradients). The wall
    time runs from `start`, less the pauses (`paused()`: checkpoints, sample grids), so that the
    throughput counts training steps only; an untimed step (`paused(untimed_step=True)`: the step
    that compiles the model) is left out of it with its time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.grad_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.applied_on_device = torch.zeros((), device=device, dtype=torch.int64)
        self.restart()

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.applied_on_device.zero_()
        self.applied, self.steps, self.start = 0, 0, time.perf_counter()
        self.untimed_steps, self.untimed_s = 0, 0.0

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, applied: bool | torch.Tensor) -> None:
        """One step taken: its loss and gradient norm count if it was applied (not skipped); applied is
        a bool, or a boolean device tensor where the step was skipped on the device."""
        self.steps += 1
        if isinstance(applied, torch.Tensor):
            self.loss_sum += torch.where(applied, loss.double(), 0.0)
            self.grad_norm_sum += torch.where(applied, grad_norm.double(), 0.0)
            self.applied_on_device += applied
        elif applied:
            self.loss_sum += loss.double()
            self.grad_norm_sum += grad_norm.double()
            self.applied += 1

    def applied_steps(self) -> int:
        """The window's applied steps (reads the device's count: at log steps only)."""
        return self.applied + int(self.applied_on_device)

    @contextlib.contextmanager
    def paused(self, untimed_step: bool = False):
        """The block's time is not the window's; with untimed_step, it is a step (added inside it)
        that the throughput leaves out, whose device work is waited for before the clock resumes."""
        # the steps queued on the GPU are the window's: done before the pause's clock starts, not
        # drained by its first host read and subtracted from the window with the pause
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        try:
            yield
            if untimed_step:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.untimed_steps += 1
                self.untimed_s += time.perf_counter() - began
        finally:
            self.start += time.perf_counter() - began

    def steps_per_sec(self, elapsed: float) -> float:
        """Steps per second of the window's timed steps over `elapsed`, its time less the pauses; a
        window of untimed steps alone, as there is nothing else to show: theirs, with their time."""
        timed = self.steps - self.untimed_steps
        return timed / elapsed if timed else self.steps / (elapsed + self.untimed_s)


def keep_latent_space(space: str, latent_cache: bool) -> str:
    """How a run trains in the latent space `space` (a VAE spec, or "pixels") of --ckpt's weights: the
    --vae to pass, or with --latent-cache (whose VAE sets the latent space: --vae decodes the grids
    alone) the cache to train on."""
    if space == "pixels":
        return "train on the images with --vae none, not on a latent cache" if latent_cache else "pass --vae none"
    return f"train on a latent cache built with --vae {space}" if latent_cache else f"pass --vae {space}"


def data_source(args: argparse.Namespace) -> str:
    """What the run reads, for the resume check: the dataset and its absolute location."""
    if args.latent_cache is not None:
        return f"latent cache {os.path.abspath(args.latent_cache)}"
    if args.dataset != "imagefolder":
        return f"--dataset {args.dataset}"
    return f"ImageFolder {os.path.abspath(args.data_path)}" if args.data_path else "ImageFolder (no --data-path)"


def saved_args(args: argparse.Namespace) -> dict:
    """The arguments as a checkpoint keeps them: the data and a local VAE folder as absolute paths, so a
    resume started from another working directory reads the same files."""
    saved = dict(vars(args))
    for key in ("data_path", "latent_cache"):
        if saved.get(key):
            saved[key] = os.path.abspath(saved[key])
    if saved.get("vae"):
        saved["vae"] = recorded_vae_spec(saved["vae"])
    return saved


# Flags a resumed run may change that change its arithmetic, not its data order or random states
# (compared as given for a checkpoint that has no "arithmetic" entry, their resolved values).
ARITHMETIC_FLAGS = ("precision", "fused_kernels", "attn_backend", "compile")
# Flags a resumed run may change that change its updates from the checkpoint's step on.
UPDATE_FLAGS = ("lr", "ema_decay", "grad_clip", "skip_nonfinite", "vae_precision")


class Trainer:
    """One training run; build with the parsed args, then call run()."""

    def __init__(self, args: argparse.Namespace, explicit: set[str], dist_info: DistInfo,
                 stop: StopRequest | None = None, setup: dict | None = None):
        """setup: filled, as the run is built, with "args" (the flags merged with a resumed checkpoint's)
        and "resumed" (whether it is a resume), for a caller whose construction failed."""
        self.dist_info = dist_info
        self.stop = stop if stop is not None else StopRequest()
        self.explicit = explicit
        self.device = dist_info.device

        # Where to write, and what to resume (rank 0 decides, everyone follows).
        setup_logging(dist_info.is_main)
        choice = None
        if dist_info.is_main:  # the other ranks wait for the choice, or the error that ends the run
            try:
                check_outside_the_images(args)
                made_from = first_missing_folder(args.exp_dir or args.results_dir)
                existed = bool(args.exp_dir) and os.path.exists(args.exp_dir)
                if existed and (holder := training_elsewhere(args.exp_dir)) is not None:  # before what its files say
                    raise UserError(f"another job is writing into {args.exp_dir} now ({holder}): wait for it to end, "
                                    f"or pass another --exp-dir")
                with choosing_a_run_folder(args):
                    exp_dir, resume_path, resume_note, numbered = select_experiment(args, explicit)
                    created = not existed if args.exp_dir else numbered
                    flag = f"--exp-dir {args.exp_dir}" if args.exp_dir else f"--results-dir {args.results_dir}"
                    make_writable_folder(os.path.join(exp_dir, "checkpoints"), flag)  # a read-only one: one line
                    for name, folder in (("log.txt", False), ("samples", True)):  # the wrong kind: a traceback later
                        path = os.path.join(exp_dir, name)
                        if os.path.exists(path) and os.path.isdir(path) != folder:
                            raise UserError(f"{path} is a {'file' if folder else 'folder'}, where the run keeps its "
                                            f"{'sample grids' if folder else 'log'}: move it aside, or pass another "
                                            f"{flag.split()[0]}")
                    hold_run_lock(exp_dir)  # one process trains into a run folder at a time
                if resume_path is None:  # what --resume auto tells this experiment by before a checkpoint records it
                    record = json.dumps({key: getattr(args, key) for key in EXPERIMENT_FLAGS}).encode()
                    try:
                        atomic_write(os.path.join(exp_dir, EXPERIMENT_RECORD), lambda f: f.write(record))
                    except OSError as err:  # an aid to --resume auto only: not worth the run
                        logger.warning(f"{os.path.join(exp_dir, EXPERIMENT_RECORD)} not written ({err}): until its "
                                       f"first checkpoint, --resume auto cannot tell this run's experiment")
                choice = exp_dir, resume_path, resume_note, created, made_from
            except UserError as err:
                choice = err
        choice = broadcast_object(choice)
        if isinstance(choice, UserError):
            raise choice
        self.exp_dir, resume_path, resume_note, created, made_from = choice
        self.checkpoint_dir = os.path.join(self.exp_dir, "checkpoints")
        self.resumed_from = resume_path
        created = created and dist_info.is_main
        self.created_folder = made_from if created else False  # False: not this run's; None: its parents were there
        barrier()
        if dist_info.is_main:
            open_log_file(self.exp_dir)  # from here on, a user error also lands in log.txt
        logger.info(resume_note + (" (--ckpt is ignored when resuming)" if resume_path and "ckpt" in explicit else ""))
        if dist_info.is_main and (leftovers := unfinished_writes(self.checkpoint_dir, _run_lock)):
            logger.warning(leftovers)
        try:
            # Rank 0 alone writes there, so a folder on its node's own disk serves a run; resuming
            # needs the checkpoint on every node (check_same_file: not another run's of that name).
            unshared = unshared_path(self.exp_dir, f"--exp-dir {args.exp_dir}" if args.exp_dir
                                     else f"--results-dir {args.results_dir}", dist_info)
            if unshared is not None:  # said by rank 0 alone
                logger.warning(f"{unshared}: checkpoints, sample grids and log.txt are written on rank 0's node "
                               f"({socket.gethostname()}) only; to resume, every node needs the checkpoint at the "
                               f"same path (copy it there, or pass a folder on a filesystem every node shares)")
            if resume_path is not None:
                check_same_file(resume_path, f"--resume {args.resume}", dist_info)

            # Each rank alone, no collective in these (agree): a failure on some ranks ends all with one line.
            def build_data():
                run_args, ckpt = args, None
                if resume_path is not None:
                    ckpt = load_training_checkpoint(resume_path)
                    run_args = merge_resumed_args(args, explicit, ckpt["args"], resume_path)
                if setup is not None:
                    setup.update(args=run_args, resumed=resume_path is not None)
                self._build_data(run_args, explicit, ckpt, resume_path)
                return ckpt

            ckpt = agree(build_data, dist_info)
            if dist_info.world_size > 1:
                self.check_same_data(dist_info)
            init_path = None
            if ckpt is None and args.ckpt:  # a new run's weights: a file, or a release by name (found or downloaded)
                init_path = local_path_on_main_first(lambda: release_or_path(args.ckpt), dist_info)
            agree(lambda: self._build_model(self.args, ckpt, resume_path, init_path), dist_info)
            self._distribute(ckpt, resume_path)
        except BaseException:
            if created:  # a run that never started leaves no numbered folder behind
                remove_unused_experiment(self.exp_dir, made_from)
            raise
        # only a resume that will run (built, with steps left to take) starts a branch
        if resume_path is not None and self.step < self.max_steps:
            def set_aside() -> str:
                try:
                    return set_aside_later_checkpoints(resume_path, self.step, self.checkpoint_dir)
                except OSError as err:
                    if err.errno is None:
                        raise
                    fix = (f"make room (or make {self.checkpoint_dir} writable)" if err.errno in WRITE_REFUSED
                           else make_room(err))
                    raise UserError(f"cannot move the checkpoints after {resume_path} aside ({refusal(err)}): {fix} "
                                    f"and resume again") from None

            moved = on_main(set_aside, dist_info)  # rank 0's error, a full disk, on every rank
            if moved:
                logger.info(moved)

    def check_same_data(self, dist_info: DistInfo) -> None:
        """Every process reads its own copy of the data: one whose copy differs from rank 0's (a node's
        local copy with an image missing, or another order) would train on other images under the same
        indices, or plan other steps per epoch and fail at a collective; refused in one line."""
        args, dataset = self.args, self.dataset
        mine = (data_fingerprint(dataset), len(dataset), dataset.num_classes)
        main = broadcast_object(mine)

        def same() -> None:
            if mine != main:
                where = (f"--latent-cache {args.latent_cache}" if args.latent_cache is not None
                         else f"--data-path {args.data_path}" if args.dataset == "imagefolder"
                         else f"--dataset {args.dataset}")
                raise UserError(f"{where} holds other data on this node than on rank 0's ({mine[1]:,} samples in "
                                f"{mine[2]} classes here, {main[1]:,} in {main[2]} there, or other names, labels or "
                                f"order): every process must read the same data (a shared filesystem, or identical "
                                f"copies)")

        agree(same, dist_info)

    def _distribute(self, ckpt: dict | None, resume_path: str | None) -> None:
        """DDP over the built model (its first collective, which broadcasts rank 0's weights), the EMA
        from those weights in a new run, and torch.compile."""
        model = self.model
        if self.dist_info.world_size > 1:
            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           gradient_as_bucket_view=True)  # broadcasts rank 0's weights
            if ckpt is None:  # a resumed EMA is the checkpoint's, on every rank
                self.ema.load_state_dict(model.state_dict())
        else:
            self.ddp = model
        self.train_model = torch.compile(self.ddp) if self.args.compile else self.ddp
        self.compile_pending = bool(self.args.compile)  # the first step compiles: left out of the throughput
        # DDP lays its gradient buckets out anew after its first synced backward, in the order the
        # gradients came: a straight run sums them in that layout from its step 2 on, a resumed one
        # would at its first step sum them in the first layout, and with 3 or more ranks another order
        # of a sum rounds otherwise (with 2, a + b is b + a). prime_buckets() lays them out first.
        self.buckets_to_prime = ckpt is not None and self.dist_info.world_size > 2

    def check_speed_flags(self, args: argparse.Namespace,
                          resume_path: str | None) -> tuple[str, tuple[bool | str, bool]]:
        """The attention backend and (the model's fused_kernels setting, whether the kernels run) for
        --attn-backend and --fused-kernels on this device; a setting that cannot run here (or a malformed
        SIT_FAST_KERNEL_LAUNCH) is a one-line UserError."""
        config = model_config(args.model)

        def origin(name: str) -> str:  # a resume takes the flags not given from its checkpoint
            return " (the checkpoint's)" if resume_path is not None and name not in self.explicit else ""

        try:
            backend = select_backend(args.attn_backend, self.device, self.autocast_dtype or torch.float32,
                                     config["hidden_size"] // config["num_heads"])
        except ValueError as err:
            raise UserError(f"--attn-backend {args.attn_backend}{origin('attn_backend')}: {err}") from None
        return backend, fused_kernels_flag(args.fused_kernels, self.device, origin=origin("fused_kernels"))

    def _build_data(self, args: argparse.Namespace, explicit: set[str], ckpt: dict | None,
                    resume_path: str | None) -> None:
        """Batch, precision, the speed flags (check_speed_flags), seed, data and latent space; user
        errors surface here (then in _build_model). No collective: every rank runs it by itself (agree)."""
        dist_info = self.dist_info
        world_size, rank = dist_info.world_size, dist_info.rank
        self.args = args
        if args.train_eps is None and ckpt is None:  # a new run; a resumed one keeps what it trained with
            args.train_eps = train_eps_of_a_new_run(args.path_type, args.prediction)
        if args.global_batch_size % world_size:
            below = args.global_batch_size // world_size * world_size
            near = " or ".join(str(n) for n in (below, below + world_size) if n > 0)
            raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size "
                            f"{world_size} (the number of processes): pass a multiple of {world_size}, such as {near}")
        self.local_batch_size = args.global_batch_size // world_size
        if ckpt is not None and "grad_accum_steps" not in explicit:
            self.keep_micro_batch(args, ckpt)
        if self.local_batch_size % args.grad_accum_steps:
            raise UserError(f"--grad-accum-steps {args.grad_accum_steps} does not divide the per-rank batch "
                            f"{self.local_batch_size} (--global-batch-size {args.global_batch_size} over "
                            f"{world_size} rank(s)): pick a divisor of {self.local_batch_size}")
        check_trackers(args, resume_path, explicit)
        try:  # checked on every device: a mistyped value fails here, not at the first log line on a GPU
            self.peak_tflops = flops.peak_tflops_from_env()
        except ValueError as err:
            raise UserError(str(err)) from None
        self.precision = resolve_precision(args.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--precision bf16 needs a GPU with bf16 support; use --precision tf32 or fp32")
        configure_matmul(self.precision)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.speed_settings = self.check_speed_flags(args, resume_path)  # before the data: a scan can take minutes
        seed = args.global_seed * world_size + rank
        seed_everything(seed)
        logger.info(f"world size {world_size}, device {self.device}, precision {self.precision}, "
                    f"rank 0 seed {args.global_seed * world_size}")
        if args.grad_accum_steps > 1:
            logger.info(f"gradient accumulation: {args.grad_accum_steps} micro-batches of "
                        f"{self.local_batch_size // args.grad_accum_steps} per rank per step "
                        f"(global batch {args.global_batch_size})")

        # Data and the latent space.
        self.codec = None
        self.cache_vae_spec = None
        if args.dataset == "digits" and args.latent_cache is None and ckpt is None:  # a new run's defaults
            if "image_size" not in explicit:
                args.image_size = 8
                logger.info("--dataset digits: image size 8 (the digits' own; --image-size to resize)")
            if "vae" not in explicit:  # grayscale: the SD VAEs take RGB
                args.vae = "none"
                logger.info("--dataset digits: pixel space (--vae none; the VAEs take RGB images)")
        if ckpt is not None and args.latent_cache is None and "vae" not in explicit:
            # a run resumed from images, having trained on a latent cache (whose args hold the default --vae,
            # unused there): the VAE of the latent space it trained in, as sample.py takes it
            space = ckpt.get("model_config", {}).get("latent_space")
            if (isinstance(space, str) and space and space != "pixels"
                    and (args.vae == "none" or not same_encoder(recorded_vae_spec(args.vae), space))):
                logger.info(f"using --vae {space}: the latent space recorded in the checkpoint")
                args.vae = space
        if args.data_path is not None and (args.dataset != "imagefolder" or args.latent_cache is not None):
            logger.warning(f"--data-path {args.data_path} is not used with "
                           + ("--latent-cache" if args.latent_cache is not None else f"--dataset {args.dataset}"))
        if args.latent_cache is not None and args.dataset != "imagefolder":
            logger.warning(f"--dataset {args.dataset} is not used with --latent-cache (the cache holds the data)")
        gray = args.vae == "none" and args.in_channels == 1  # a gray model in pixel space: an image folder read so
        dataset = build_dataset(args.dataset, args.data_path, args.image_size, args.latent_cache, 1 if gray else 3)
        if isinstance(dataset, LatentCacheDataset):
            if "image_size" in explicit and args.image_size != dataset.image_size:
                raise UserError(f"--image-size {args.image_size} differs from the latent cache's {dataset.image_size}: "
                                f"leave --image-size out (the cache's is taken) or pass {dataset.image_size}")
            if ckpt is not None and args.image_size != dataset.image_size:
                raise UserError(f"the latent cache {args.latent_cache} holds {dataset.image_size}px images; "
                                f"the run being resumed ({resume_path}) trained on {args.image_size}px: "
                                f"resume it with a cache of that size, or start a new run")
            args.image_size = dataset.image_size
            latent_size, channels = dataset.latent_size, dataset.channels
            self.cache_vae_spec = dataset.index["vae"]
            if "vae" in explicit and args.vae == "none" and args.sample_every is not None:
                logger.warning(f"--vae none is not used with --latent-cache: the sample grids are decoded with the "
                               f"VAE the cache records ({self.cache_vae_spec}); --sample-every none for no grids")
            elif "vae" in explicit and args.vae != "none" and args.sample_every is None:
                logger.warning(f"--vae {args.vae} is not used with --latent-cache and --sample-every none (with a "
                               f"cache, the VAE only decodes the sample grids)")
            elif "vae" in explicit and args.vae != "none" and not same_encoder(recorded_vae_spec(args.vae),
                                                                               self.cache_vae_spec):
                logger.warning(f"the sample grids are decoded with --vae {args.vae}; the latent cache "
                               f"{args.latent_cache} was encoded with {self.cache_vae_spec}: unless the two share an "
                               f"encoder, the grids are not the model's samples (leave --vae out to use the cache's)")
        elif args.vae == "none":
            latent_size, channels = args.image_size, dataset.channels
        else:
            if ckpt is not None and ckpt.get("model_config", {}).get("latent_space") == "pixels":  # before loading it
                raise UserError(f"--vae {args.vae}: the run being resumed ({resume_path}) trains in pixel space, which "
                                f"a resumed run keeps: leave --vae out (or pass --vae none)")
            if dataset.channels != 3:
                raise UserError(f"--dataset {args.dataset} has {dataset.channels}-channel images; the VAE needs RGB: "
                                f"use --vae none")
            from sit_fast.vae import check_image_size, load_vae

            check_image_size(args.image_size, args.vae)  # the SD VAEs' before loading them
            self.codec = load_vae(args.vae, self.device, dtype=self.vae_dtype())
            check_image_size(args.image_size, args.vae, self.codec)
            latent_size, channels = args.image_size // self.codec.downsample, self.codec.latent_channels
        if args.in_channels is not None and args.in_channels != channels:
            if ckpt is not None and ckpt["args"].get("in_channels") is not None:  # the run's, given now or not
                raise UserError(f"the run being resumed ({resume_path}) has {args.in_channels} input channels, "
                                f"the data {channels}: resume it on data of its latent space (--vae, --latent-cache), "
                                f"or start a new run")
            raise UserError(f"--in-channels {args.in_channels} does not match the data, which has {channels} "
                            f"channel{'s' if channels > 1 else ''}")
        args.in_channels = channels
        if args.num_classes is None:
            args.num_classes = dataset.num_classes
        elif args.num_classes < dataset.num_classes:
            if ckpt is not None and ckpt["args"].get("num_classes") is not None:  # the run's, given now or not
                raise UserError(f"the run being resumed ({resume_path}) has {args.num_classes} classes, the data "
                                f"{dataset.num_classes}: resume it on its own data, or start a new run (--ckpt "
                                f"{resume_path} to start from its weights)")
            raise UserError(f"--num-classes {args.num_classes} is smaller than the dataset's {dataset.num_classes} "
                            f"classes: pass --num-classes {dataset.num_classes} or more, or leave it out to take the "
                            f"dataset's")
        patch = model_config(args.model)["patch_size"]
        if latent_size % patch:
            unit = "latent" if latent_size != args.image_size else "image"
            raise UserError(f"the {unit} size {latent_size} (from --image-size {args.image_size}) is not divisible "
                            f"by the patch size {patch} of {args.model}")
        self.dataset, self.latent_size, self.channels = dataset, latent_size, channels
        self.sampler = EpochSampler(len(dataset), self.local_batch_size, rank, world_size, args.global_seed,
                                    flip=dataset.flip)
        logger.info(f"dataset: {len(dataset):,} samples, {dataset.num_classes} classes, "
                    f"{self.sampler.steps_per_epoch} steps per epoch; "
                    f"model input {channels}x{latent_size}x{latent_size}")

    def _build_model(self, args: argparse.Namespace, ckpt: dict | None, resume_path: str | None,
                     init_path: str | None) -> None:
        """Model (from --ckpt's file on this node, init_path, in a new run), EMA, optimizer and run
        position. No collective, as _build_data."""
        channels, latent_size = self.channels, self.latent_size
        config = model_config(args.model)
        backend, (fused, fused_on) = self.speed_settings
        note = (" (through the Triton interpreter on the CPU: very slow, for tests)"
                if fused_on and self.device.type != "cuda" else "")
        logger.info(f"attention: {backend}; fused adaLN kernels: {'on' if fused_on else 'off'}{note}; "
                    f"compile: {'on' if args.compile else 'off'}")
        # What sets the rounding, as resolved here ("auto" differs by device): kept in checkpoints, so a
        # resume can tell whether its steps are bit for bit the run's.
        self.arithmetic = {"precision": self.precision, "attention": backend, "fused kernels": bool(fused_on),
                           "compile": bool(args.compile), **sdpa_arithmetic(backend)}
        # learn_sigma (upstream trains with it; its extra outputs take no part in the loss) as the weights
        # the run starts from or continues have it
        learn_sigma, init_weights = True, None
        if ckpt is not None:
            learn_sigma = bool(ckpt.get("model_config", {}).get("learn_sigma", True))
        elif init_path is not None:
            init_weights, info = read_checkpoint(init_path, prefer="model" if args.use_raw else "ema")
            init_space = (recorded_model_config(init_path) or {}).get("latent_space")  # what it was trained in
            check_training_args(info, {k: getattr(args, k) for k in ("path_type", "prediction")},
                                source=f"--ckpt {args.ckpt}", advice="pass the same to go on training its "
                                "model; with these its output is trained to another quantity")
            try:
                found = infer_config(init_weights)
            except CheckpointError:
                found = None  # not SiT's shapes: loading below says what differs
            if found is not None:
                arch = (found["depth"], found["hidden_size"], found["patch_size"])
                if arch != (config["depth"], config["hidden_size"], config["patch_size"]):
                    name = registry_name(*arch)
                    fix = f"pass --model {name}" if name else "no registry model has its shapes"
                    raise UserError(f"--ckpt {args.ckpt} is a {name or 'SiT'} (depth {arch[0]}, hidden {arch[1]}, "
                                    f"patch {arch[2]}), not a {args.model}: {fix}")
                learn_sigma = found["learn_sigma"]
                if found["in_channels"] != channels:  # the model's channels are the data's: a flag changes them
                    space, now = init_space, self.latent_space()
                    gray = found["in_channels"] == 1 and now == "pixels" and args.dataset == "imagefolder"
                    cached = args.latent_cache is not None
                    why = " (it was trained in pixel space)" if space == "pixels" else " (its latent space)"
                    fix = ("pass --in-channels 1 (an image folder is then read as gray)"
                           if gray and space in (None, now)
                           else f"it was trained on {found['in_channels']}-channel images" if space == now == "pixels"
                           else keep_latent_space(space, cached) + why if isinstance(space, str) and space
                           else "use a latent cache built with the VAE it was trained with (or its images with --vae "
                                "none for a pixel-space model)" if cached
                           else "use the --vae it was trained with (--vae none for a pixel-space model)")
                    raise UserError(f"--ckpt {args.ckpt} takes {found['in_channels']}-channel inputs, the data here "
                                    f"has {channels} ({'images' if now == 'pixels' else 'latents of ' + now}): {fix}")
                if found["input_size"] != latent_size:  # the image size it takes, in this run's latent space
                    size = found["input_size"] * args.image_size // latent_size
                    fix = (f"train on a latent cache of {size}px images" if args.latent_cache is not None
                           else f"pass --image-size {size}")
                    raise UserError(f"--ckpt {args.ckpt} was trained at model input size {found['input_size']}, i.e. "
                                    f"{size}px images here, not {args.image_size}px: {fix}")
            if not learn_sigma:
                logger.info(f"learn_sigma=False, as the weights of --ckpt {args.ckpt}")
        model = SiT_models[args.model](
            input_size=latent_size, in_channels=channels, num_classes=args.num_classes, learn_sigma=learn_sigma,
            attn_backend=args.attn_backend, fused_kernels=fused, grad_checkpointing=args.grad_checkpointing)
        model = model.to(self.device)
        if init_weights is not None:
            info.update(load_into_model(model, init_weights, source=args.ckpt))
            init_weights = None
            held = {"ema": "its EMA weights", "model": "its raw weights, not the EMA's"}.get(
                info["weights"], "a plain state_dict")  # "raw": a file of one set of weights, which it does not name
            logger.info(f"initialised from {args.ckpt} ({held})")
            space, now = init_space, self.latent_space()
            if isinstance(space, str) and space and not same_encoder(space, now):  # same channels: else refused above
                keep = keep_latent_space(space, args.latent_cache is not None)
                logger.warning(f"--ckpt {args.ckpt} was trained in the latent space of {space}; this run trains in "
                               f"that of {now}: unless the two VAEs share an encoder, its weights start from another "
                               f"latent space ({keep} to keep its own)")
            if info["step"] is not None and info["optimizer"]:  # upstream's --ckpt meant "resume"; here a new run
                logger.warning(f"--ckpt {args.ckpt} is a training checkpoint (step {info['step']}): this is a new "
                               f"run from its {info['weights']} weights at step 0, with a fresh optimizer; to "
                               f"continue that run (optimizer, step, data order) pass --resume {args.ckpt}")
            elif info["optimizer"]:  # upstream train.py's own checkpoint: no step, data position or RNG to resume
                logger.warning(f"--ckpt {args.ckpt} is a training checkpoint with an optimizer state: this is a new "
                               f"run from its {info['weights']} weights at step 0, with a fresh optimizer (--resume "
                               f"continues only checkpoints of this train.py, which record step, data order and RNG)")
        if ckpt is not None:
            load_into_model(model, ckpt["model"], source=f"{resume_path} (model)")
            self.warn_on_another_latent_space(ckpt, resume_path)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0,
                                     fused=True if fused_adamw(self.device) else None)
        self.ema = deepcopy(model).requires_grad_(False).eval()
        if ckpt is not None:
            load_into_model(self.ema, ckpt["ema"], source=f"{resume_path} (ema)")
            # the saved groups replace ours: keep this run's --lr, and how AdamW runs on this device (a
            # CPU checkpoint resumed on CUDA ran unfused); torch then places each step count to suit
            run_here = {key: self.opt.param_groups[0].get(key) for key in ("fused", "foreach")}
            saved = ckpt["opt"]
            self.opt.load_state_dict({**saved, "param_groups": [{**group, **run_here, "lr": args.lr}
                                                                for group in saved["param_groups"]]})
        self.ema_params = list(self.ema.parameters())
        self.model_params = list(model.parameters())
        self.window = LogWindow(self.device)
        # the first step (self.step_counter) whose loss was not finite, -1 while there is none
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        # steps skipped on the device (--skip-nonfinite with fused AdamW), not yet in nonfinite_skipped
        self.skipped_on_device = torch.zeros((), dtype=torch.int64, device=self.device)
        self.transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps,
                                          args.sample_eps)
        try:  # an eps of 0 that puts a singular end in the interval: said now, not at the first step or grid
            eps = self.transport.train_eps, self.transport.sample_eps
            self.transport.check_interval(*eps)
            if args.sample_every is not None:  # the grids' ODE, as Sampler.sample_ode checks it
                self.transport.check_interval(*eps, sde=False, eval=True, last_step_size=0.0)
        except ValueError as err:
            raise UserError(in_flag_words(err)) from None
        if "train_eps" in self.explicit and not self.transport.eps_matters():
            logger.warning(f"--train-eps {args.train_eps:g} has no effect: a {args.path_type} velocity model trains "
                           f"on all of [0, 1] whatever it is (as upstream)")
        if "loss_weight" in self.explicit and args.loss_weight is not None and args.prediction == "velocity":
            logger.warning(f"--loss-weight {args.loss_weight} has no effect: a velocity model's loss is unweighted "
                           f"(as upstream); it weights --prediction score or noise")
        if args.ckpt_keep is None and args.ckpt_keep_every is not None and "ckpt_keep_every" in self.explicit:
            logger.warning(f"--ckpt-keep-every {args.ckpt_keep_every} has no effect without --ckpt-keep: "
                           f"every checkpoint is kept")
        elif args.ckpt_keep is not None and args.ckpt_keep_every is not None and args.ckpt_keep_every % args.ckpt_every:
            both = math.lcm(args.ckpt_keep_every, args.ckpt_every)
            logger.warning(f"--ckpt-keep-every {args.ckpt_keep_every} is not a multiple of --ckpt-every "
                           f"{args.ckpt_every}: the milestones kept are the checkpoints at the multiples of both, "
                           f"step {both}, {2 * both}, ...")
        grid_flags = [f"--{key.replace('_', '-')}" for key in GRID_FLAGS if key in self.explicit]
        if args.sample_every is None and grid_flags:
            logger.warning(f"{', '.join(grid_flags)} {'has' if len(grid_flags) == 1 else 'have'} no effect with "
                           f"--sample-every none: there are no sample grids")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"SiT parameters: {n_params:,} ({args.model}, {args.num_classes} classes)")
        self.step_flops = flops.train_step_flops(model)

        # Position in the run.
        self.step, self.epoch, self.step_in_epoch, self.nonfinite_skipped = 0, 0, 0, 0
        self.skipped_in_a_row = 0  # steps of the log windows in a row that were all skipped
        self.last_checkpoint = None
        # A resume in the checkpoint's own run folder goes on in its wandb run; one into another folder (a
        # branch, which the run may outlive) starts a wandb run of its own.
        own_run = ckpt is not None and (os.path.realpath(os.path.dirname(os.path.dirname(resume_path)))
                                        == os.path.realpath(self.exp_dir))
        self.wandb_id = ckpt.get("wandb_id") if own_run else None
        if ckpt is not None:
            self.restore_position(ckpt, resume_path)
        # The run ends at --max-steps or at the end of epoch --epochs, whichever comes first.
        epochs_end = self.step + (args.epochs - self.epoch) * self.sampler.steps_per_epoch - self.step_in_epoch
        self.max_steps = epochs_end if args.max_steps is None else min(args.max_steps, max(epochs_end, self.step))
        self.epochs_limit = args.max_steps is not None and self.max_steps < args.max_steps
        self.step_counter = torch.full((), self.step, dtype=torch.int64, device=self.device)
        self.tb_writer = self.wandb = None
        self.phase = "train"  # what runs now, for the advice on running out of memory

    # ------------------------------------------------------------------ resume
    def keep_micro_batch(self, args: argparse.Namespace, ckpt: dict) -> None:
        """A run resumed with another per-rank batch (another number of ranks or --global-batch-size)
        keeps its micro-batch (and so its activation memory per GPU), not its count of micro-batches,
        when --grad-accum-steps is not given; where the micro-batch does not divide the new per-rank
        batch, the largest one below it that does."""
        saved_world = ckpt.get("data", {}).get("world_size")
        saved_batch = ckpt["args"].get("global_batch_size")
        saved_parts = ckpt["args"].get("grad_accum_steps", 1)
        if not saved_world or not saved_batch or saved_batch // saved_world == self.local_batch_size:
            return
        micro = saved_batch // (saved_world * saved_parts)
        if micro < 1:
            return
        # the fewest micro-batches that divide the per-rank batch into parts no larger than the run's
        parts = next(p for p in range(1, self.local_batch_size + 1)
                     if self.local_batch_size % p == 0 and self.local_batch_size // p <= micro)
        if parts != args.grad_accum_steps:
            now = self.local_batch_size // parts
            kept = (f"the run's micro-batch of {micro} per rank" if now == micro else
                    f"micro-batches of {now} per rank, the largest that divides the batch of {self.local_batch_size} "
                    f"and is no larger than the run's {micro}")
            world = self.dist_info.world_size
            logger.info(f"--grad-accum-steps {parts}: {kept} (the run had {saved_parts} micro-batch(es) per step, a "
                        f"global batch of {saved_batch} on {saved_world} rank(s); now {self.local_batch_size * world} "
                        f"on {world})")
            args.grad_accum_steps = parts

    def restore_position(self, ckpt: dict, path: str) -> None:
        args, world_size = self.args, self.dist_info.world_size
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        self.last_checkpoint = path
        data = ckpt.get("data", {})
        steered = [f"--{k.replace('_', '-')} {ckpt['args'][k]} -> {getattr(args, k)}" for k in UPDATE_FLAGS
                   if k in ckpt["args"] and ckpt["args"][k] != getattr(args, k)
                   and (k != "vae_precision" or self.codec is not None)]  # no VAE encoding the batches: grids alone
        if steered:
            logger.info(f"resumed with {', '.join(steered)} (given now; the run had the former): the updates from "
                        f"step {self.step} on may not be those the run would have made")
        same_layout = (data.get("world_size") == world_size and data.get("global_batch_size") == args.global_batch_size
                       and data.get("num_samples") == len(self.dataset) and data.get("seed") == args.global_seed)
        rng = ckpt["rng"]
        if same_layout and len(rng) == world_size:
            self.step_in_epoch = int(ckpt["step_in_epoch"])
            restore_rng_state(rng[self.dist_info.rank], self.device)
            source, saved_source = data_source(args), data.get("source")
            if saved_source is not None and saved_source != source:
                logger.warning(f"resumed at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} in it) "
                               f"on other data: the run was trained on {saved_source}, this one reads {source}; "
                               f"the data order is exact only if that is the same data, moved")
            elif ckpt["args"].get("grad_accum_steps", 1) != args.grad_accum_steps:
                logger.warning(f"resumed at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} in it) "
                               f"with --grad-accum-steps {args.grad_accum_steps}, the run had "
                               f"{ckpt['args'].get('grad_accum_steps', 1)}: the data order is exact, the noise and "
                               f"time draws (one per micro-batch) are not those of the original run")
            else:
                where = f"resumed at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} in it)"
                saved, now = ckpt.get("arithmetic"), self.arithmetic
                flags = not isinstance(saved, dict)
                if flags:  # written before the resolved values were kept: the flags, named as flags
                    saved, now = ckpt["args"], {k: getattr(args, k) for k in ARITHMETIC_FLAGS}
                changed = [f"{'--' + k.replace('_', '-') if flags else k} {saved[k]} -> {now[k]}"
                           for k in now if k in saved and saved[k] != now[k]]
                if changed:
                    masks = (" and the label-dropout masks (Inductor draws its own)"
                             if saved.get("compile", now["compile"]) != now["compile"] else "")
                    logger.info(f"{where}: the data order and random states are the run's; {', '.join(changed)} "
                                f"changes the rounding{masks}, so the steps are not bit for bit the original run's")
                elif steered:
                    logger.info(f"{where}: the data order and random states are the run's (the flags above changed)")
                elif self.other_latents:
                    logger.info(f"{where}: the data order and random states are the run's; the latents are another "
                                f"VAE's (above), so the steps are not the original run's")
                else:
                    logger.info(f"{where}: exact")
        else:
            consumed = int(ckpt["step_in_epoch"]) * int(data.get("global_batch_size", args.global_batch_size))
            self.step_in_epoch = consumed // args.global_batch_size
            if self.step_in_epoch >= self.sampler.steps_per_epoch:  # the epoch is over in the new layout
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            seed_everything((args.global_seed * world_size + self.dist_info.rank) * 1_000_003 + self.step)
            now = {"world_size": world_size, "global_batch_size": args.global_batch_size,
                   "num_samples": len(self.dataset), "seed": args.global_seed}
            labels = {"world_size": "world size", "global_batch_size": "--global-batch-size",
                      "num_samples": "dataset size", "seed": "--global-seed"}
            changes = [f"{labels[k]} {data.get(k, 'unrecorded')} -> {v}" for k, v in now.items() if data.get(k) != v]
            saved_source = data.get("source")
            moved = saved_source is not None and saved_source != data_source(args)  # or other data of the same size
            if moved:
                changes.append(f"data {saved_source} -> {data_source(args)}")
            changes = changes or [f"{len(rng)} saved random states for {world_size} rank(s)"]
            if self._same_global_batches({**data, "source": None} if moved else data):
                what = (f"each step's samples are the run's{' if that is the same data, moved' if moved else ''} (the "
                        f"same global batches, dealt out to the ranks otherwise); the noise and time draws are not "
                        f"those of the original run")
            else:
                what = "the data order and random streams are not those of the original run"
            logger.warning(f"resumed at step {self.step} with {', '.join(changes)} (the run's, now): {what}")

    def _same_global_batches(self, data: dict) -> bool:
        """Whether only the world size changed, in a way that leaves every step's samples as they were:
        a global batch is a run of G consecutive places of the epoch's permutation, whatever the world
        size, unless the epoch's length (padding and the dropped last batch) comes out otherwise."""
        saved_world = data.get("world_size")
        if not isinstance(saved_world, int) or saved_world < 1 or saved_world == self.dist_info.world_size or any(
                data.get(k) != v for k, v in (("global_batch_size", self.args.global_batch_size),
                                              ("num_samples", len(self.dataset)), ("seed", self.args.global_seed))):
            return False
        if data.get("source") is not None and data["source"] != data_source(self.args):  # other data, same size
            return False
        if self.args.global_batch_size % saved_world:
            return False
        saved_steps = math.ceil(len(self.dataset) / saved_world) // (self.args.global_batch_size // saved_world)
        return saved_steps == self.sampler.steps_per_epoch

    # ------------------------------------------------------------------ checkpoints
    def check_weights(self) -> None:
        """Before a checkpoint: the weights are finite, and (DDP) every rank's are rank 0's.

        A non-finite loss is caught from the step after it; an update from non-finite gradients with a
        finite loss would reach this checkpoint first. Compares per-tensor norms of model and EMA."""
        params = self.model_params + self.ema_params
        # finiteness element by element: a norm overflows for finite weights of 1e19 or more
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all().to(torch.int64).reshape(1)
        all_reduce(finite, dist.ReduceOp.MIN if is_distributed() else None)
        if not int(finite):
            if self.args.skip_nonfinite:  # steps with non-finite gradients were skipped: an update overflowed
                cause, advice = "an update overflowed", "a lower --lr or --grad-clip"
            else:
                cause = "an update from non-finite gradients, or one that overflowed"
                advice = "a lower --lr, --grad-clip, or --skip-nonfinite (which skips steps with non-finite gradients)"
            where = (f"last good checkpoint: {self.last_checkpoint}; resume from it with {advice}"
                     if self.last_checkpoint
                     else f"no checkpoint written yet; start again with {advice}")
            raise NonFiniteLossError(f"the weights became non-finite by step {self.step} ({cause}) and are not saved; "
                                     f"{where}")
        if not is_distributed():
            return
        norms = torch.stack(torch._foreach_norm(params)).float()  # (2 * P,)
        gathered = [torch.empty_like(norms) for _ in range(self.dist_info.world_size)]
        dist.all_gather(gathered, norms)
        differing = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
        if differing:
            raise RuntimeError(f"step {self.step}: the weights of rank(s) {differing} differ from rank 0's "
                               f"(a DDP bug or a nondeterministic op outside DDP)")

    def save_checkpoint(self) -> str:
        """Every rank contributes its RNG state; rank 0 writes the file atomically."""
        self.check_weights()
        states = gather_object(capture_rng_state(self.device))
        path = checkpoint_path(self.checkpoint_dir, self.step)

        self.count_skipped()

        def write() -> None:  # on rank 0; its UserError (a full disk) reaches every rank
            checkpoint = {
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "args": saved_args(self.args),
                "step": self.step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "data": {"seed": self.args.global_seed, "num_samples": len(self.dataset),
                         "global_batch_size": self.args.global_batch_size, "world_size": self.dist_info.world_size,
                         "source": data_source(self.args)},
                "rng": states,
                "nonfinite_skipped": self.nonfinite_skipped,
                "arithmetic": self.arithmetic,
                "wandb_id": self.wandb_id,
                "model_config": {"model": self.args.model, "input_size": self.latent_size, "in_channels": self.channels,
                                 "num_classes": self.args.num_classes, "learn_sigma": self.model.learn_sigma,
                                 "latent_space": self.latent_space()},
                "version": CHECKPOINT_VERSION,
            }
            with interrupt_after():  # Ctrl-C while writing: finish the file, then stop
                try:
                    atomic_torch_save(checkpoint, path)
                except OSError as err:
                    if err.errno == errno.ENOENT and not os.path.isdir(self.checkpoint_dir):
                        raise UserError(f"step {self.step}: cannot write checkpoint {path}: the folder "
                                        f"{self.checkpoint_dir} is gone (deleted while the run went on?); put it "
                                        f"back and continue with --resume auto, or start again") from None
                    if err.errno is None:
                        raise
                    once = ("the file size limit is raised" if err.errno == errno.EFBIG
                            else "the folder has room and can be written" if err.errno in WRITE_REFUSED
                            else "the disk is fixed (the system log says what failed)")
                    kept = (f"the last checkpoint, {self.last_checkpoint}, is kept: continue from it with --resume "
                            f"auto once {once}" if self.last_checkpoint else
                            f"no checkpoint was written yet: run again once {once}")
                    raise UserError(f"step {self.step}: cannot write checkpoint {path} ({refusal(err)}); {kept}") \
                        from None
                logger.info(f"saved checkpoint {path}")
                self.last_checkpoint = path  # complete on disk: what a Ctrl-C raised here names
                self.delete_older_checkpoints()
        on_main(write, self.dist_info)
        self.last_checkpoint = path
        return path

    def delete_older_checkpoints(self) -> None:
        """--ckpt-keep N, on rank 0 once the checkpoint of this step is written whole: the run's older
        checkpoints past the newest N are deleted, but for the multiples of --ckpt-keep-every. One that
        cannot be deleted (or a folder that cannot be listed) is a warning: the run goes on."""
        keep = self.args.ckpt_keep
        if keep is None:
            return
        flag = f"--ckpt-keep {keep}"
        try:
            older = checkpoints_past_keep(self.checkpoint_dir, self.step, keep, self.args.ckpt_keep_every)
        except OSError as err:
            logger.warning(f"{flag}: cannot list {self.checkpoint_dir} ({refusal(err)}); no checkpoint deleted")
            return
        for path in older:
            try:
                os.remove(path)
            except FileNotFoundError:  # deleted meanwhile
                continue
            except OSError as err:
                logger.warning(f"{flag}: cannot delete {path} ({refusal(err)}); it is kept")
                continue
            logger.info(f"deleted checkpoint {path} ({flag})")

    def warn_without_room(self, written: str | None = None) -> None:
        """Rank 0 (which alone writes checkpoints), as training starts and after each checkpoint but the
        last (`written`): a warning where the checkpoint folder has less free space than a checkpoint
        takes (the one just written, else the one resumed, else checkpoint_bytes' estimate), naming the
        step of the next, at which the run would stop, unable to write it, with the steps since the last
        one lost. A warning, not a refusal: space may be made meanwhile, or taken by other jobs. A
        folder whose free space cannot be read (an OSError) is not checked."""
        every = self.args.ckpt_every
        upcoming = min((self.step // every + 1) * every, self.max_steps)
        try:
            size = (os.path.getsize(written) if written is not None
                    else os.path.getsize(self.resumed_from) if self.resumed_from is not None
                    else checkpoint_bytes(self.model, self.ema, self.opt, self.dist_info.world_size))
            free = shutil.disk_usage(self.checkpoint_dir).free
        except OSError:
            return
        if free >= size:
            return
        start = written is None and self.resumed_from is None
        lost = "its steps" if start else f"the steps since step {self.step}"
        if written is not None:
            fix = f"make room there before then, or stop the run and resume {written} into another --exp-dir"
        elif self.resumed_from is not None:
            fix = "make room there, or resume into another --exp-dir"
        else:
            fix = f"make room there, or pass another {'--exp-dir' if self.args.exp_dir else '--results-dir'}"
        logger.warning(f"{f'step {self.step}: ' if written else ''}{self.checkpoint_dir} has {amount(free)} free"
                       f"{' left' if written else ''}, less than a checkpoint of this run takes ({amount(size)}): "
                       f"the {'first' if start else 'next'}, at step {upcoming}, will not fit, and the run would "
                       f"stop there with {lost} lost; {fix}")

    def warn_on_another_latent_space(self, ckpt: dict, resume_path: str) -> None:
        """A resumed run whose VAE changed (same channels: else refused above) goes on, with a warning:
        the SD VAEs (ema, mse) share one encoder, and a local copy of a VAE is the same VAE."""
        before, now = ckpt.get("model_config", {}).get("latent_space"), self.latent_space()
        self.other_latents = bool(before) and not same_encoder(before, now)
        if self.other_latents:
            logger.warning(f"the run being resumed ({resume_path}) trained in the latent space of {before}; it "
                           f"continues in that of {now}: unless the two VAEs share an encoder, start a new run "
                           f"from its weights (--ckpt) instead")

    def latent_space(self) -> str:
        """"pixels", or the VAE (a local directory made absolute, so sample.py finds it from anywhere)."""
        if self.cache_vae_spec:
            return self.cache_vae_spec
        if self.codec is None:
            return "pixels"
        return recorded_vae_spec(self.args.vae)

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def save_samples(self) -> str | None:
        """An EMA sample grid (fixed noise and labels) from a fixed-step ODE; rank 0 only."""
        args = self.args
        codec = self.codec
        if codec is None and self.cache_vae_spec is not None:  # before sampling: there may be no grid to draw
            codec = self.load_cache_vae()
            if codec is None:
                return None
        generator = torch.Generator().manual_seed(args.global_seed % 2**64)
        n = args.num_sample_images
        z = torch.randn(n, self.channels, self.latent_size, self.latent_size, generator=generator).to(self.device)
        y = torch.randint(0, args.num_classes, (n,), generator=generator).to(self.device)
        sample_fn = Sampler(self.transport).sample_ode(sampling_method=args.sample_method, num_steps=args.sample_steps)
        if args.cfg_scale != 1.0:  # below 1 too, as sample.py (upstream's train.py left the grid unguided)
            z = torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, args.num_classes)])
            latent = self.codec is not None or self.cache_vae_spec
            cfg_channels = default_cfg_channels(z.shape[1]) if latent else "all"

            def model_fn(x, t, y):
                return self.ema.forward_with_cfg(x, t, y, args.cfg_scale, cfg_channels=cfg_channels)
        else:
            model_fn = self.ema.forward
        with self.autocast():
            samples = sample_fn(z, model_fn, y=y)[-1].float()[:n]
        images = codec.decode(samples) if codec is not None else samples.clamp(-1, 1)
        # a sample that is not finite, or that the VAE decoded to NaN, is said, not left to be found in the PNG
        broken = int(((~samples.isfinite()).flatten(1).any(1) | images.isnan().flatten(1).any(1)).sum())
        if broken:
            logger.warning(f"step {self.step}: {broken} of the {n} EMA samples in the grid are not finite (NaN "
                           f"pixels drawn black, inf clamped): the EMA weights, or the VAE decoding their samples, "
                           f"overflowed")
        from sit_fast.images import save_image_grid

        path = os.path.join(self.exp_dir, "samples", f"{self.step:07d}.png")
        try:
            path = save_image_grid(images, path)
        except OSError as err:  # a grid is not worth the run: the next checkpoint will say if the disk stays full
            if err.errno is None:  # (or failing)
                raise
            logger.warning(f"step {self.step}: the sample grid is skipped: cannot write {path} ({refusal(err)})")
            return None
        logger.info(f"saved EMA samples {path}")
        self.track_image(path)
        return path

    def load_cache_vae(self):
        """The VAE that made the latent cache, for sample grids only; None (logged) if unavailable."""
        if getattr(self, "_cache_codec", False) is False:
            from sit_fast.vae import load_vae

            spec = self.args.vae if "vae" in self.explicit and self.args.vae != "none" else self.cache_vae_spec
            try:
                self._cache_codec = load_vae(spec, self.device, dtype=self.vae_dtype())
            except UserError as err:
                logger.warning(f"sample grids are skipped: {err}")
                self._cache_codec = None
            if self._cache_codec is not None and self._cache_codec.latent_channels != self.channels:
                logger.warning(f"sample grids are skipped: the VAE {spec} decodes {self._cache_codec.latent_channels}"
                               f"-channel latents; the latent cache's have {self.channels} (leave --vae out to "
                               f"decode with the cache's VAE)")
                self._cache_codec = None
        return self._cache_codec

    def vae_dtype(self) -> torch.dtype:
        """The arithmetic the VAE runs in (--vae-precision)."""
        return torch.bfloat16 if self.args.vae_precision == "bf16" else torch.float32

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ one step
    def batch_to_latents(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.dataset, LatentCacheDataset):
            mean, std, y = (t.to(self.device, non_blocking=True) for t in batch)
            return LatentCodec.sample(mean, std), y  # a draw from the stored posterior
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = torch.as_tensor(y).to(self.device, non_blocking=True)
        if self.codec is not None:
            mean, std = self.codec.encode(x)
            x = LatentCodec.sample(mean, std)
        return x, y

    def prime_buckets(self, micro_batch) -> None:
        """A resumed run's DDP: one forward and backward of the step's first micro-batch, its gradients
        dropped and the random states restored, so that DDP lays its buckets out in the order the
        gradients come before the step, the layout of a straight run's steps after its first."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            x, y = self.batch_to_latents(micro_batch)
            with self.autocast():
                loss = self.transport.training_losses(self.train_model, x, dict(y=y))["loss"].mean()
            loss.backward()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self, batch) -> tuple[torch.Tensor, bool]:
        """_train_step; the first of a compiled run's process, which compiles the model (minutes at
        SiT-XL/2), is left out of the log's throughput, and its time said on a line of its own."""
        if not self.compile_pending:
            return self._train_step(batch)
        self.compile_pending = False
        began = time.perf_counter()
        with self.window.paused(untimed_step=True):
            result = self._train_step(batch, pause_priming=False)
        took = time.perf_counter() - began
        logger.info(f"step {self.step + 1} compiled the model (--compile) and ran in {took:.1f} s, left out of the "
                    f"log's throughput")
        return result

    def _train_step(self, batch, pause_priming: bool = True) -> tuple[torch.Tensor, bool]:
        """Forward, backward, optimizer and EMA; returns (detached loss, whether the update was applied).

        With --grad-accum-steps K the batch is cut into K equal micro-batches, each taken through the
        VAE, forward and backward in turn with its mean loss scaled by 1/K: the summed gradients are
        those of the whole batch's mean loss. DDP all-reduces only in the last backward (no_sync)."""
        parts = self.args.grad_accum_steps
        micro_batches = [batch] if parts == 1 else list(zip(*(torch.chunk(torch.as_tensor(t), parts) for t in batch)))
        if self.buckets_to_prime:
            self.buckets_to_prime = False
            # also the compilation, where --compile: done here, not in the step (pause_priming False: a
            # pause of the whole step holds this one)
            with self.window.paused() if pause_priming else contextlib.nullcontext():
                self.prime_buckets(micro_batches[0])
        self.opt.zero_grad(set_to_none=True)
        loss = None
        for index, micro_batch in enumerate(micro_batches):
            x, y = self.batch_to_latents(micro_batch)
            defer_sync = index < parts - 1 and self.ddp is not self.model
            with self.ddp.no_sync() if defer_sync else contextlib.nullcontext():
                with self.autocast():
                    part_loss = self.transport.training_losses(self.train_model, x, dict(y=y))["loss"].mean()
                (part_loss / parts if parts > 1 else part_loss).backward()
            part_loss = part_loss.detach() / parts if parts > 1 else part_loss.detach()
            loss = part_loss if loss is None else loss + part_loss
        applied = True
        if self.args.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model_params, self.args.grad_clip, foreach=True)
        else:
            grad_norm = total_grad_norm(self.model_params)
        if self.args.skip_nonfinite:
            finite = torch.isfinite(grad_norm)
            if self.opt.param_groups[0].get("fused"):
                # Fused AdamW leaves the parameters and its state as they are where found_inf is 1 (as
                # under GradScaler), and the EMA's weight is 0 there: the step is skipped on the device.
                self.opt.found_inf = (~finite).float()
                applied = finite
            else:
                applied = bool(finite)  # the one host sync this option costs with AdamW unfused (CPU)
        self.window.add_step(loss, grad_norm, applied)
        if applied is not False:
            self.opt.step()
            with torch.no_grad():  # ema <- ema + (1 - decay) * (param - ema), on the device
                weight = 1.0 - self.args.ema_decay
                if applied is not True:  # 0 where skipped: a 0-d weight per tensor, lerp's own kernel for each
                    weight = [applied * weight] * len(self.ema_params)
                torch._foreach_lerp_(self.ema_params, self.model_params, weight)
        return loss, applied

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to the end of the run, or to a stop signal (StopRequest): returns a summary whose
        "stopped_by" names that signal (None at the end of the run)."""
        args, is_main = self.args, self.dist_info.is_main
        if self.step >= self.max_steps:
            by_epochs = self.epochs_limit or args.max_steps is None
            name, value = ("epochs", args.epochs) if by_epochs else ("max_steps", args.max_steps)
            flag = "--" + name.replace("_", "-")
            given = "" if name in self.explicit else "the checkpoint's"
            if by_epochs:
                bound = f"the end of epoch {value} ({flag} {value}{', ' + given if given else ''})"
            else:
                bound = f"{flag} {value}{f' ({given})' if given else ''}"
            logger.info(f"nothing to do: step {self.step} is at or past the end of the run, {bound}: pass a larger "
                        f"{flag} to train further")
            if self.created_folder is not False:  # a new folder for a checkpoint at its end: none is left behind
                remove_unused_experiment(self.exp_dir, self.created_folder)
            return self.summary(None, {})
        on_main(self.open_trackers, self.dist_info)  # rank 0's trackers; a failure to open them ends every rank
        self.model.train()
        bar = None
        if is_main and not args.no_progress and sys.stderr.isatty():  # in a log file, the log lines are the progress
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                       file=sys.stderr)
        limit = (f" (the end of epoch {args.epochs}, --epochs, before --max-steps {args.max_steps})"
                 if self.epochs_limit else "")
        logger.info(f"training from step {self.step} to step {self.max_steps}{limit}")
        if is_main:
            self.warn_without_room()
        last_log = {}
        stop = self.stop
        stop.connect()
        held = bool(stop.previous)  # main() caught the stop signals before the run: it puts them back as it ends
        stop.install()
        stop.catch_interrupt()  # a first Ctrl-C from here on stops after the step with a checkpoint
        stopped_by = None
        failed = True
        try:
            last_log, stopped_by = self._loop(stop, bar)
            failed = False
        finally:
            # Stopped by a signal: its handlers stay (main() restores them as it ends), so that the signal
            # sent again (SLURM signals every process, torchrun passes it on) is noted, not the default
            # action's end in the middle of closing the trackers and saying where to resume. Failed, under
            # main(): the stop signals' stay too (torchrun's SIGTERM, sent as a peer ends, would end the
            # process that outlived it before it says why), Ctrl-C's is put back.
            kept = failed and held and not stopped_by
            stop.restore(handlers=not (stopped_by or kept), ctrl_c=kept)
            if bar is not None:
                bar.close()
            self.close_trackers(failed)  # on an error too: the scalars logged up to it are written
        if stopped_by:
            resume = self.last_checkpoint
            logger.warning(f"stopped by {stopped_by} after step {self.step}; checkpoint {resume}: continue with "
                           f"--resume {resume} (or --resume auto)")
        else:
            samples = os.path.join(self.exp_dir, "samples")
            grids = f"sample grids in {samples}" if os.path.isdir(samples) else "no sample grids"
            logger.info(f"done: step {self.step}, last checkpoint {self.last_checkpoint}; {grids}, this log in "
                        f"{os.path.join(self.exp_dir, 'log.txt')}")
        return self.summary(stopped_by, last_log)

    def count_skipped(self) -> None:
        """Adds the steps skipped on the device since the last count to nonfinite_skipped, and says so
        (a host read: at log and checkpoint steps, the same count on every rank)."""
        count = int(self.skipped_on_device)
        if count:
            self.skipped_on_device.zero_()
            self.nonfinite_skipped += count
            logger.warning(f"{count} step(s) up to step {self.step}: non-finite gradients, skipped "
                           f"({self.nonfinite_skipped} so far)")

    def summary(self, stopped_by: str | None, last_log: dict) -> dict:
        self.count_skipped()
        return {"step": self.step, "epoch": self.epoch, "exp_dir": self.exp_dir,
                "last_checkpoint": self.last_checkpoint,
                "nonfinite_skipped": self.nonfinite_skipped, "stopped_by": stopped_by, **last_log}

    def _loop(self, stop: StopRequest, bar) -> tuple[dict, str | None]:
        """Steps until the end of the run or an agreed stop request: (the last log line's figures,
        the name of the signal that stopped it or None)."""
        args, device, window = self.args, self.device, self.window
        window.restart()
        last_log = {}
        if self.step_in_epoch >= self.sampler.steps_per_epoch:  # nothing left of this epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.step < self.max_steps:  # one loader for the rest of the run, across epochs
            batches = RunBatches(self.sampler, self.epoch, self.step_in_epoch, self.max_steps - self.step)
            loader = iter(())
            try:
                # Workers start holding the stop signals until they ignore them; one that came meanwhile
                # is acted on when the loader is whole, inside this try, which stops its workers.
                with stop_signals_held():
                    loader = make_loader(self.dataset, batches, args.num_workers, device.type == "cuda",
                                         seed=(args.global_seed * 100_003 + self.epoch) * 1009 + self.dist_info.rank,
                                         worker_init_fn=ignore_stop_signals)
                for batch in self.batches_saving_on_a_data_error(loader):
                    loss, applied = self.train_step(batch)
                    self.step += 1
                    self.step_in_epoch += 1
                    self.step_counter += 1
                    if applied is False:
                        self.nonfinite_skipped += 1
                        logger.warning(f"step {self.step}: non-finite gradients, step skipped "
                                       f"({self.nonfinite_skipped} so far)")
                    else:
                        bad = ~torch.isfinite(loss)
                        if applied is not True:  # skipped on the device where False: counted there
                            bad &= applied
                            self.skipped_on_device += ~applied
                        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step_counter, self.first_bad)
                    if self.step_in_epoch == self.sampler.steps_per_epoch:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    if bar is not None:
                        bar.update(1)

                    last = self.step >= self.max_steps
                    if self.step % args.log_every == 0 or last:
                        last_log = self.log(bar)
                    checkpoint_now = self.step % args.ckpt_every == 0 or last
                    grid_now = args.sample_every is not None and self.step % args.sample_every == 0
                    if checkpoint_now or grid_now:
                        with window.paused():  # throughput counts training steps only
                            # The grid before the checkpoint: a run killed between the two resumes from
                            # the one before and draws the grid again, where a grid after it was never
                            # drawn. A grid that fails saves the checkpoint itself.
                            if checkpoint_now:
                                self.check_finite()  # a diverged run ends here, before drawing its grid
                            if grid_now:
                                self.phase = "samples"  # the others wait on the host group, not NCCL's 10 minutes
                                self.sample_grid_or_save()
                                self.phase = "train"
                            if checkpoint_now:
                                written = self.save_checkpoint()
                                if self.dist_info.is_main and not last:
                                    self.warn_without_room(written)
                    if last:
                        break
                    stopped_by = stop.agreed()
                    if stopped_by:
                        if window.steps:
                            last_log = self.log(bar)
                        if self.last_checkpoint != checkpoint_path(self.checkpoint_dir, self.step):
                            self.check_finite()
                            self.save_checkpoint()
                        return last_log, stopped_by
            except UserError as err:  # raised in a loader worker: its message, not the worker's traceback
                raise worker_error(err) from None
            finally:  # workers ignore SIGTERM (StopRequest), so they are stopped here, also on an error
                close_loader(loader)
        return last_log, None

    def sample_grid_or_save(self) -> None:
        """save_samples on rank 0; where it fails (out of memory, say), the weights are whole: every rank
        first saves a checkpoint of this step, then the run ends with the error."""
        failure = None

        def grid() -> str | None:
            nonlocal failure
            try:
                self.save_samples()
            except Exception as err:  # noqa: BLE001 -- raised below, on every rank, after the checkpoint
                failure = err
                return f"{type(err).__name__}: {first_line(err)}"
            return None

        error = on_main(grid, self.dist_info)
        if error is None:
            return
        if self.last_checkpoint != checkpoint_path(self.checkpoint_dir, self.step):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed grid left cached, for the checkpoint's copies
            try:
                self.check_finite()
                self.save_checkpoint()
            except UserError as err:  # a non-finite loss, a full disk: said, and the grid's error raised
                logger.warning(f"the sample grid failed, and the checkpoint of step {self.step} too: {err}")
        if failure is not None:
            raise failure
        raise PeerFailed(f"rank 0 failed sampling the EMA grid after step {self.step}: {error}")

    def batches_saving_on_a_data_error(self, loader):
        """The loader's batches; a data error (an unreadable image) first saves the steps taken, in a
        single process, and names the checkpoint to continue from once the data is fixed."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as err:
                err = worker_error(err)
                unsaved = self.step > 0 and self.last_checkpoint != checkpoint_path(self.checkpoint_dir, self.step)
                if unsaved and not is_distributed():  # under torchrun the other ranks are not here to save with
                    with self.window.paused():
                        self.check_finite()
                        self.save_checkpoint()
                if self.last_checkpoint is None:
                    where = "no checkpoint written yet"
                else:
                    where = (f"last checkpoint {self.last_checkpoint}: fix the data, then continue with --resume "
                             f"{self.last_checkpoint} (or --resume auto)")
                raise type(err)(f"{err} (stopped before step {self.step + 1}; {where})") from None
            yield batch

    def out_of_memory_advice(self, memory: str = "GPU memory") -> str:
        """What ran out of `memory` ("GPU memory", or the CPU's "memory"), and the flags that make it fit
        (those not in use already)."""
        args = self.args
        where = f"at step {self.step + 1} on {self.device}"
        if self.phase == "samples":
            last = f"; last checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
            return (f"out of {memory} after step {self.step} on {self.device} "
                    f"sampling the EMA grid of --num-sample-images "
                    f"{args.num_sample_images}: lower it{' or --cfg-scale 1' if args.cfg_scale != 1 else ''}{last}")
        parts = args.grad_accum_steps
        micro = self.local_batch_size // parts
        batch = f"a batch of {self.local_batch_size} per GPU" + (f" in micro-batches of {micro}" if parts > 1 else "")
        fixes = []
        more = next((k for k in range(parts + 1, self.local_batch_size + 1) if self.local_batch_size % k == 0), None)
        if more is not None:
            fixes.append(f"--grad-accum-steps {more} (the same global batch, micro-batches of "
                         f"{self.local_batch_size // more})")
        if self.precision != "bf16":
            fixes.append("--precision bf16")
        if self.codec is not None and args.vae_precision != "bf16":  # the VAE encodes every batch
            fixes.append("--vae-precision bf16")
        if not args.grad_checkpointing:
            fixes.append("--grad-checkpointing")
        fixes.append("a smaller --global-batch-size")
        last = f"; last checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        return (f"out of {memory} {where} training {args.model} with {batch}: fit it with "
                f"{', '.join(fixes[:-1])} or {fixes[-1]} (USAGE.md, Memory){last}")

    def check_finite(self) -> None:
        """Stop (on every rank) if any rank saw a non-finite loss; reads one small tensor."""
        bad = self.first_bad.clone()
        bad = torch.where(bad < 0, torch.full_like(bad, 2**62), bad)
        all_reduce(bad, dist.ReduceOp.MIN if is_distributed() else None)
        bad_step = int(bad)
        if bad_step < 2**62:
            advice = "a lower --lr, --grad-clip, or --skip-nonfinite"
            where = (f"last good checkpoint: {self.last_checkpoint}; resume from it with {advice}"
                     if self.last_checkpoint
                     else f"no checkpoint written yet; start again with {advice}")
            raise NonFiniteLossError(f"the loss became non-finite at step {bad_step} (noticed at step {self.step}); "
                                     f"{where}")

    def check_skipped_in_a_row(self, applied: int) -> None:
        """Stop once the log windows of SKIPPED_IN_A_ROW_LIMIT steps in a row had all their steps skipped
        (--skip-nonfinite; applied: the window's applied steps): the same on every rank, which all
        applied the same steps."""
        self.skipped_in_a_row = self.skipped_in_a_row + self.window.steps if applied == 0 else 0
        if self.skipped_in_a_row >= SKIPPED_IN_A_ROW_LIMIT:
            first = self.step - self.skipped_in_a_row + 1
            where = (f"last checkpoint: {self.last_checkpoint}; resume from one from before the divergence"
                     if self.last_checkpoint else "no checkpoint written yet; start again")
            raise NonFiniteLossError(f"every step from step {first} to step {self.step} had non-finite gradients and "
                                     f"was skipped (--skip-nonfinite): the run has diverged; {where} with a lower "
                                     f"--lr or --grad-clip")

    def log(self, bar) -> dict:
        """Write the log line of the window's steps (all ranks' losses) and start the next window."""
        window = self.window
        stats = all_reduce(torch.stack([window.loss_sum, window.grad_norm_sum]))
        self.check_finite()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        loss_total, norm_total = stats.tolist()
        # every rank applied the same steps; the gradient norm is the same on every rank (DDP averages
        # the gradients), summed by the all-reduce like the losses
        self.count_skipped()
        applied = window.applied_steps()  # a read of the device's count
        self.check_skipped_in_a_row(applied)
        count = applied * self.dist_info.world_size
        avg_loss = loss_total / count if count else math.nan  # every step of the window skipped: nothing to show
        grad_norm = norm_total / count if count else math.nan
        steps_per_sec = window.steps_per_sec(elapsed)
        images_per_sec = steps_per_sec * self.args.global_batch_size
        record = {"loss": avg_loss, "grad_norm": grad_norm, "steps_per_sec": steps_per_sec,
                  "images_per_sec": images_per_sec}
        # upstream's line first, as scripts that read its logs parse it; then what it lacks
        line = (f"(step={self.step:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
                f"Grad Norm: {grad_norm:.4f}, Images/Sec: {images_per_sec:.1f}")
        if self.device.type == "cuda":
            device_flops = self.step_flops * images_per_sec / self.dist_info.world_size
            mfu = flops.mfu(device_flops, torch.cuda.get_device_name(self.device),
                            self.autocast_dtype or torch.float32, tf32=self.precision == "tf32",
                            peak=self.peak_tflops)
            record["tflops_per_device"] = device_flops / 1e12
            line += f", TFLOP/s/GPU: {device_flops / 1e12:.1f}"
            if mfu is not None:
                record["mfu"] = mfu
                line += f", MFU: {100 * mfu:.1f}%"
        if self.nonfinite_skipped:
            line += f", skipped non-finite steps: {self.nonfinite_skipped}"
        line += f", Step: {self.step}/{self.max_steps}"  # a log file's progress, where no bar is drawn
        if steps_per_sec > 0 and self.step < self.max_steps and window.untimed_steps < window.steps:  # not a compile's
            line += f", ETA: {duration((self.max_steps - self.step) / steps_per_sec)}"
        logger.info(line)
        if bar is not None:
            bar.set_postfix(loss=f"{avg_loss:.4f}", img_s=f"{images_per_sec:.0f}",
                            **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}))
        if self.dist_info.is_main:
            self.track(record)
        window.restart()  # after the console and trackers: their time is not the next steps'
        return record

    # ------------------------------------------------------------------ trackers
    def open_trackers(self) -> None:
        args = self.args
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError(f"--tensorboard needs the tensorboard package ({err}): "
                                f"pip install tensorboard") from None
            self.tb_writer = SummaryWriter(os.path.join(self.exp_dir, "tensorboard"))
        if args.wandb:
            try:
                import wandb
            except ImportError as err:
                raise UserError(f"--wandb needs the wandb package ({err}): pip install wandb") from None
            try:
                run_id = self.wandb_id or secrets.token_hex(4)  # a resumed run goes on in its wandb run
                self.wandb = wandb.init(entity=os.environ.get("ENTITY"), project=os.environ.get("PROJECT", "sit_fast"),
                                        name=os.path.basename(self.exp_dir), config=dict(vars(args)), id=run_id,
                                        resume="allow")
                # Plotted against the training step, logged as a value: a resumed run logs steps that its
                # wandb run already has (those after its checkpoint), which wandb drops when given as
                # log(step=...) (its own step only increases).
                self.wandb.define_metric("train/step")
                for name in ("train/*", "samples"):
                    self.wandb.define_metric(name, step_metric="train/step")
                self.wandb_id = run_id
            except Exception as err:  # not logged in, no network, an entity or project it cannot use
                self.close_trackers(failed=True)
                raise UserError(f"--wandb: wandb.init failed: {first_line(err)} (wandb login, or WANDB_MODE=offline; "
                                f"$ENTITY and $PROJECT name the entity and project)") from None

    def track(self, record: dict) -> None:
        if self.tb_writer is not None:
            for key, value in record.items():
                self.tb_writer.add_scalar(f"train/{key}", value, self.step)
        if self.wandb is not None:
            self.wandb.log({"train/step": self.step, **{f"train/{k}": v for k, v in record.items()}})

    def track_image(self, path: str) -> None:
        """The sample grid at `path`, to TensorBoard and wandb when they are on."""
        if self.tb_writer is None and self.wandb is None:
            return
        if self.tb_writer is not None:
            from PIL import Image

            with Image.open(path) as image:
                self.tb_writer.add_image("samples", np.asarray(image.convert("RGB")), self.step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(path), "train/step": self.step})

    def close_trackers(self, failed: bool = False) -> None:
        """Flush and close TensorBoard and wandb (a run that failed is marked so in wandb)."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
        if self.wandb is not None:
            if failed:
                self.wandb.finish(exit_code=1)
            else:
                self.wandb.finish()
            self.wandb = None


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, train, and return a summary (step, loss, experiment dir, ...)."""
    args, explicit = parse_args(argv)
    stop = StopRequest()
    start_resource_tracker()
    dist_info = init_distributed()  # a stop signal while it waits for the other processes ends this one
    stop.install()  # from here on, a stop signal ends the run after its first step instead of killing it
    trainer, setup = None, {}
    try:
        trainer = Trainer(args, explicit, dist_info, stop, setup)
        summary = trainer.run()
        if summary["stopped_by"]:  # a scheduler sees the job as terminated, not finished
            raise SystemExit(128 + getattr(signal, summary["stopped_by"]))
        return summary
    except UserError as err:
        log_to_file(f"error: {' '.join(str(err).split())}")
        raise
    except Exception as err:  # noqa: BLE001 -- out of memory only, also wrapped by torch.compile; or a peer's end
        # the rank that ended says why (torchrun's summary names it): here, one line
        if is_distributed() and peer_ended(err):
            where = "before training started" if trainer is None else f"at step {trainer.step}"
            last = trainer.last_checkpoint if trainer is not None else None
            error = peer_failed(err, f" {where}", f"its error is in the torchrun summary of its node; last checkpoint: "
                                                  f"{last or 'none written yet'}")
            log_to_file(f"error: {error}")
            raise error from None
        if not is_out_of_memory(err):
            raise
        run = trainer.args if trainer is not None else setup.get("args", args)  # a resumed run's, once merged
        sizes = (f"--image-size {run.image_size}, --global-batch-size {run.global_batch_size}, --sample-steps "
                 f"{run.sample_steps}, --num-sample-images {run.num_sample_images}")
        message = allocation_past_device(err, dist_info.device, sizes)
        if message is not None and trainer is not None and trainer.last_checkpoint:
            message += f"; last checkpoint: {trainer.last_checkpoint}"
        elif message is None and trainer is None:  # building the model, EMA, optimizer or VAE, or reading a checkpoint
            memory = memory_kind(err)
            machine = "a GPU" if memory == "GPU memory" else "a machine"
            what, smaller = ((f"{run.model} (the run being resumed)", "") if setup.get("resumed")
                             else (run.model, "a smaller --model, or "))
            message = (f"out of {memory} on {dist_info.device} setting up {what} before its first step: "
                       f"{smaller}{machine} with more free memory (USAGE.md, Memory)")
        elif message is None:
            message = trainer.out_of_memory_advice(memory_kind(err))
        log_to_file(f"error: {message}")
        raise UserError(message) from None
    except KeyboardInterrupt:
        if trainer is None:
            message = "interrupted before training started"
        else:
            last = trainer.last_checkpoint
            resume = f"{last}; continue with --resume {last} (or --resume auto)" if last else "none written yet"
            message = f"interrupted at step {trainer.step}; last checkpoint: {resume}"
        if dist_info.is_main:
            log_to_file(message)
            print(f"\n{message}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        try:  # the handlers are held to the very end: a stop signal sent again while the run leaves is noted
            release_run_lock()
            cleanup()
            reset_logging()
        finally:
            stop.restore()
