"""User-facing errors: one line that says what was wrong and how to fix it, never a traceback."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Callable


class UserError(ValueError):
    """An error caused by the user's input (flags, files, configuration); its message is the fix."""


class PeerFailed(UserError):
    """This process stops because another process of the job failed or ended first: its own error is
    that process's, which torchrun's failure summary on its node should name as the root cause (see
    report; each node's torchrun lists its own processes only)."""


# torchrun names as the root cause the failure of the earliest error-file timestamp, in whole seconds,
# a tie going to the lowest rank: a PeerFailed is dated this much later, so the process whose end
# it reports (dated when it wrote its error, or, without one, when torchrun saw it end) comes first.
PEER_FAILED_LATER_S = 2
# ... and a process whose own error ends the job stays this long after writing it, so that torchrun,
# which ends the others as soon as one exits, does not end them before they write theirs (one ended
# without an error file is dated when torchrun saw it end: within the same second, the lowest rank,
# maybe one of them, would be named the root cause, and its line would be torchrun's "To enable traceback").
LINGER_S = 1.5
# ... and a process that stops for another's failure stays longer than that, so that the failed process
# ends first: the torchrun of torch 2.9 (and 2.7) names only the processes that ended by themselves,
# not the ones it ended, so a faster PeerFailed alone was named, without the error that caused it.
PEER_LINGER_S = 3.0


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes some libraries put in their messages


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"  # torch's RuntimeError on the CPU
# A GPU library's own allocation failing where the caching allocator holds the memory (a cuBLAS handle's
# workspace, cuDNN's): a RuntimeError naming the status, out of GPU memory all the same
GPU_LIBRARY_OUT_OF_MEMORY = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
ASKED = re.compile(r"tried to allocate ([0-9.]+) ?(bytes|B|KiB|MiB|GiB|TiB)\b", re.IGNORECASE)
UNIT_BYTES = {"bytes": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# torch's RuntimeError for a tensor of 2**63 bytes or more (a size flag near 2**63): no allocation is tried,
# yet it is one past every device's memory
SIZE_OVERFLOWED = "Storage size calculation overflowed"


def out_of_memory_cause(error: BaseException) -> BaseException | None:
    """The out-of-memory error behind `error` (itself, or one that torch.compile wrapped in its own
    exception): torch's on a GPU or on the CPU, a GPU library's failed allocation (cuBLAS, cuDNN), or
    Python's MemoryError, or a tensor too large for its size in bytes to be counted (SIZE_OVERFLOWED); None
    if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (_gpu_out_of_memory(error) or isinstance(error, MemoryError) or CPU_OUT_OF_MEMORY in str(error)
                or SIZE_OVERFLOWED in str(error)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _gpu_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return (type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text
            or any(status in text for status in GPU_LIBRARY_OUT_OF_MEMORY))


def is_out_of_memory(error: BaseException) -> bool:
    return out_of_memory_cause(error) is not None


def memory_kind(error: BaseException) -> str:
    """What ran out: "GPU memory" for a GPU's out-of-memory error, "memory" for the CPU's."""
    cause = out_of_memory_cause(error)
    return "GPU memory" if cause is not None and _gpu_out_of_memory(cause) else "memory"


def amount(size: float) -> str:
    """A number of bytes as the messages give it (sizes on disk, allocations): "2.0 TiB", "1.5 GiB", "12 MiB",
    "3 KiB", "1000 bytes"."""
    for unit, scale, digits in (("TiB", 2**40, 1), ("GiB", 2**30, 1), ("MiB", 2**20, 0), ("KiB", 2**10, 0)):
        if size >= scale:
            return f"{size / scale:.{digits}f} {unit}"
    size = int(size)
    return f"{size} byte{'' if size == 1 else 's'}"


def device_bytes(device) -> int | None:
    """The whole memory of a torch device: the GPU's, or the machine's for the CPU (None if unknown)."""
    try:
        if device.type == "cuda":
            import torch
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, RuntimeError, AssertionError):
        pass
    return None


def allocation_past_device(error: BaseException, device, sizes: str) -> str | None:
    """For an out-of-memory error whose one allocation was larger than the device's whole memory (a
    size flag far too large, not a batch a little too big): a message that says so and names the
    size flags to check (`sizes`, with their values); None otherwise."""
    cause = out_of_memory_cause(error)
    total = device_bytes(device)
    if cause is not None and SIZE_OVERFLOWED in str(cause):
        has = f"the {amount(total)} it has in all" if total is not None else "any device has"
        return (f"out of memory on {device}: one allocation asked for 2**63 bytes or more, more than {has}: a size "
                f"given is far too large (check {sizes})")
    asked = ASKED.search(str(cause)) if cause is not None else None
    if asked is None or total is None:
        return None
    count = float(asked.group(1)) * UNIT_BYTES[asked.group(2).lower()]
    if count <= total:
        return None
    return (f"out of {memory_kind(error)} on {device}: one allocation asked for {amount(count)}, more than the "
            f"{amount(total)} it has in all: a size given is far too large (check {sizes})")


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line, for a one-line error that quotes a library."""
    text = [line.strip() for line in ANSI.sub("", str(err)).strip().splitlines() if line.strip()]
    if not text:
        return type(err).__name__
    line = f"{type(err).__name__}: {text[0]}" if isinstance(err, LookupError) else text[0]  # a bare key says little
    if len(line) <= limit:
        return line
    cut = line[:limit]  # whole sentences, else whole words
    end = cut.rfind(". ")
    return cut[:end + 1] if end > limit // 3 else cut[:cut.rfind(" ")].rstrip(",;:") + " ..."


class StderrLineHandler(logging.Handler):
    """`warning: <message on one line>` to whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}\n")


def log_warnings_on_stderr(is_main: bool) -> None:
    """sit_fast's warnings on stderr, one line each, from rank 0 (other ranks: errors only), for the
    scripts that keep no log file (sample.py, the latent cache)."""
    logger = logging.getLogger("sit_fast")
    for handler in logger.handlers:  # e.g. a training run's, earlier in this process
        handler.close()
    logger.handlers[:] = [StderrLineHandler()]
    logger.setLevel(logging.WARNING if is_main else logging.ERROR)
    logger.propagate = False


def report(message: str, later_s: int = 0) -> None:
    """Print `error: message` on stderr, once per torchrun job rather than once per process.

    Under torchrun every process also writes the line to its error file (TORCHELASTIC_ERROR_FILE),
    which torchrun prints in its failure summary in place of "To enable traceback see ...". So the
    other ranks leave stderr to rank 0; an error that only some ranks hit still shows, in that summary.
    Where rank 0 was killed, the lowest rank still running on its node prints the line in its place.
    later_s: how much later than now to date the error there (PEER_FAILED_LATER_S for a PeerFailed).
    """
    line = f"error: {' '.join(message.split())}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                # the layout of torch.distributed.elastic's ErrorHandler, less the traceback
                stamp = str(int(time.time()) + later_s)
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": stamp}}}, f)
        except OSError:
            error_file = None
    # where a process group was joined: rank 0 killed (it says nothing), the lowest process of its node
    # still running speaks in its place (distributed.speaks_for)
    distributed = sys.modules.get("sit_fast.distributed")
    if (os.environ.get("RANK", "0") == "0" or not error_file
            or (distributed is not None and bool(distributed.speaks_for()))):
        print(line, file=sys.stderr)
        if distributed is not None:
            distributed.mark_said()


def line_buffered_stdout() -> None:
    """stdout written line by line also to a file or a pipe (nohup, a scheduler's log), as stderr is:
    a job's first lines (what it will do, where its output goes) are in the log as they are printed,
    not when the buffer fills or the job ends, nor lost with a job that is killed."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):  # a closed or detached stream: nothing to do
            pass


def quiet_ctrl_c_while_loading(module_name: str) -> None:
    """Called first by a script or `python -m` module with its __name__: run as the program, a Ctrl-C
    in the seconds its libraries take to load ends it as SIGINT's default action does, with no
    traceback of the import it cut short; cli_entry gives Ctrl-C its KeyboardInterrupt back. A
    program that handles SIGINT its own way keeps its handler."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.modules["__main__"].sigint_quiet_while_loading = True


def cli_entry(main: Callable) -> Callable:
    """Wrap a script's main(): a UserError is printed as one line `error: ...` on stderr (report)
    with exit status 2, a Ctrl-C or stop signal the job did not handle as "interrupted" or "stopped
    by SIGTERM" with the shell's status (130, 143); anything else propagates as a bug. A console
    that goes away meanwhile (a closed pipe, a hung-up terminal) costs the lines written to it, not
    the work."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from sit_fast.interrupts import console_loss_ignored, exit_status, stop_signals_noted, what_stopped

        script = sys.modules.get("__main__")
        if (getattr(script, "sigint_quiet_while_loading", False)
                and threading.current_thread() is threading.main_thread()):
            script.sigint_quiet_while_loading = False  # quiet_ctrl_c_while_loading's SIG_DFL
            if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        line_buffered_stdout()
        with console_loss_ignored():
            try:
                return main(*args, **kwargs)
            except UserError as err:
                peer = isinstance(err, PeerFailed)
                later_s = PEER_FAILED_LATER_S if peer else 0
                if os.environ.get("TORCHELASTIC_ERROR_FILE") and os.environ.get("WORLD_SIZE", "1") != "1":
                    with stop_signals_noted() as noted:  # torchrun ending it, or a Ctrl-C passed on: exit 2 now
                        report(str(err), later_s)
                        deadline = time.monotonic() + (PEER_LINGER_S if peer else LINGER_S)
                        while not noted and not getattr(err, "stop_noted", False) and time.monotonic() < deadline:
                            time.sleep(0.05)
                else:
                    report(str(err), later_s)
                sys.exit(2)
            except KeyboardInterrupt as err:  # before the job began (joining the other processes), or as it ended
                print(what_stopped(err), file=sys.stderr)
                sys.exit(exit_status(err))

    return wrapper
