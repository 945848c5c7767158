"""Stopping long jobs: stop signals, data-loader workers, and a console that goes away.

A scheduler stops a job with SIGTERM (preemption, the time limit), or warns it with SIGUSR1 (SLURM's
`--signal=USR1@SECONDS`); SIGHUP comes when the terminal closes. Training turns them into a stop
after the current step, with a checkpoint (training.checkpointing.StopRequest). The jobs that keep
their results as they go (the FID job's PNGs, the latent cache's shards, the finished batches of
--likelihood and --reverse) stop the way Ctrl-C stops them instead: `stop_signals_raise` makes the
first stop signal raise `Stopped`, a KeyboardInterrupt, where the job is.

Data-loader workers ignore all of them (the main process decides when to stop), and a console that
went away (a closed pipe, a hung-up terminal) costs the lines written to it, not the job
(`console_loss_ignored`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from typing import Callable

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGHUP")
WORKER_IGNORED = (*STOP_SIGNALS, "SIGINT")  # a terminal's Ctrl-C reaches the data loader workers too


def _stop_signal_numbers() -> set[int]:
    return {getattr(signal, name) for name in WORKER_IGNORED if hasattr(signal, name)}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a scheduler signals every process of the job, and a terminal's Ctrl-C
    its whole process group; a worker killed by SIGTERM, or ended by SIGINT, would fail the main
    process's next batch. The main process decides when to stop, and stops its workers.

    Workers started under stop_signals_held() hold the stop signals until this has run: one that
    arrived earlier is dropped here rather than reaching the handler torch's worker installs first
    (which kills the worker for a SIGTERM from anyone but its parent)."""
    for signum in _stop_signal_numbers():
        signal.signal(signum, signal.SIG_IGN)  # also discards a held one
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _stop_signal_numbers())


@contextlib.contextmanager
def stop_signals_held():
    """Hold the stop signals in this thread while data loader workers are started in the block.

    A forked worker inherits the hold, so a signal sent to the whole job while a worker starts waits
    until ignore_stop_signals has run in it. This process still receives it, when the block ends: the
    mask holds it only from this thread, and where another thread takes it (gloo's, CUDA's) Python
    would run its handler here at once, in the middle of the workers' start (a loader half built,
    whose workers nothing then stops); so within the block the handlers only note a signal, and
    the ones in place get it, in order, once the block is done. Without pthread_sigmask, or off the
    main thread, a no-op."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    with stop_signals_noted() as noted:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signal_numbers())
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one held reaches the noting handler
    for signum in noted:
        signal.raise_signal(signum)


def start_resource_tracker() -> None:
    """Where loader workers start by spawn or forkserver (Python 3.14's default on Linux), start
    multiprocessing's resource tracker now, holding the stop signals, which it then holds for life.

    That helper process otherwise starts at the first multiprocessing lock (tqdm makes one at the
    first log line) and ignores only SIGINT and SIGTERM: a SIGHUP or SIGUSR1 sent to the whole job
    would kill it, and the one started in its place at the next lock prints a traceback for each
    lock it never knew. Started by the first loader instead, under stop_signals_held, it would also
    undo that hold: its start unblocks SIGINT and SIGTERM in the calling thread, and the fork server
    started next, whose children the workers are, would hold only the other stop signals. With fork
    (the default before 3.14) there is no tracker to start. The start method is read, not fixed: the
    caller may still set it."""
    import multiprocessing
    from multiprocessing import resource_tracker

    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        return
    with stop_signals_held():
        resource_tracker.ensure_running()


class Stopped(KeyboardInterrupt):
    """A stop signal, raised in the main thread where the job was, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def what_stopped(err: KeyboardInterrupt) -> str:
    """"stopped by SIGTERM" for a stop signal, "interrupted" for Ctrl-C."""
    return f"stopped by {err.name}" if isinstance(err, Stopped) else "interrupted"


def exit_status(err: KeyboardInterrupt) -> int:
    """128 + the signal's number, the shell's convention (130 for Ctrl-C)."""
    return 128 + (err.signum if isinstance(err, Stopped) else signal.SIGINT)


def catch_stop_signals(handler, previous: dict) -> None:
    """Install `handler` for each stop signal, in the main thread only (elsewhere signals keep their
    handlers), except those in `previous` already and those the process ignores (nohup ignores
    SIGHUP: the job goes on when the terminal closes). The handlers replaced go into `previous`."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signum not in previous and signal.getsignal(signum) != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)


def catch_ctrl_c(handler, previous: dict) -> None:
    """Install `handler` for Ctrl-C (SIGINT) as catch_stop_signals does for the stop signals: in the main
    thread only, unless in `previous` already or ignored by the process (a shell script's `job &`); the
    handler replaced goes into `previous`."""
    if (signal.SIGINT not in previous and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) != signal.SIG_IGN):
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)


def restore_handlers(previous: dict) -> None:
    """Put back the handlers catch_stop_signals (or the like) replaced, and forget them."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    previous.clear()


@contextlib.contextmanager
def stop_signals_noted():
    """Within the block, the stop signals and Ctrl-C are noted in the list it yields, not acted on
    (as catch_stop_signals: in the main thread, those the process does not ignore)."""
    noted: list[int] = []

    def note(signum, frame):
        noted.append(signum)

    previous = {}
    catch_ctrl_c(note, previous)
    catch_stop_signals(note, previous)
    try:
        yield noted
    finally:
        restore_handlers(previous)


_WINDING_DOWN: list = []  # the line of winding_down (or its function), while a stopped job finishes what it keeps
_RAISING: list[bool] = []  # one per stop_signals_raise block open in the main thread


def winding_down(line: str | Callable[[], str]) -> None:
    """A job stopped by Ctrl-C or a stop signal (in a stop_signals_raise block) now finishes what it keeps:
    the queued PNGs, the loader's workers, the summary. Until the block ends, the stop signals sent again
    are dropped, and another Ctrl-C ends the process at once: `line` (what is kept, what is left
    unfinished) on stderr, once per machine, and exit status 130, not a KeyboardInterrupt wherever the
    teardown was (its traceback, or a line that says nothing of what is kept). Called again, the line
    is replaced; outside such a block (a job's parts called on their own), a no-op. A function for `line` is
    called at the second Ctrl-C (what is kept counted then: another node's processes may write on meanwhile)."""
    if _RAISING:
        _WINDING_DOWN[:] = [line]


def _end_at_once(line: str | Callable[[], str]) -> None:
    """A second Ctrl-C while a stopped job winds down: `line`, then exit 130 with no more teardown (a write
    cut short stays under its temporary name, atomic_write's; a folder's lock goes with the process). The
    data loader's workers, which ignore the stop signals, are killed first: left, they would read on for
    seconds, until they saw their parent gone."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            with contextlib.suppress(Exception):
                child.kill()
    with contextlib.suppress(Exception):  # a console that went away, a stream closed
        sys.stdout.flush()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine; unbuffered, safe mid-print
        if callable(line):
            try:
                line = line()
            except Exception:  # what is kept could not be told: the exit is not put off for it
                line = "interrupted again, stopping at once"
        with contextlib.suppress(OSError):
            os.write(2, f"\n{line}\n".encode())
    os._exit(128 + signal.SIGINT)


@contextlib.contextmanager
def stop_signals_raise():
    """Within the block, the first stop signal raises Stopped in the main thread, and Ctrl-C
    KeyboardInterrupt as always; later stop signals are dropped, so the cleanup it starts (queued PNGs
    finished, workers stopped) is not cut short by the same signal coming again (SLURM signals every
    process, and torchrun passes it on as well). Once the job says it winds down (winding_down), a
    Ctrl-C ends it at once, with the job's line. A signal the process started out ignoring stays
    ignored (SIGHUP under nohup, SIGINT under `&`). Off the main thread, a no-op."""
    raised = []

    def handle(signum, frame):
        if signum == signal.SIGINT:
            if _WINDING_DOWN:
                _end_at_once(_WINDING_DOWN[0])
            raised.append(signum)
            raise KeyboardInterrupt  # as Python's own handler
        if not raised:
            raised.append(signum)
            raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    catch_ctrl_c(handle, previous)
    catch_stop_signals(handle, previous)
    _RAISING.append(True)
    try:
        yield
    finally:
        _RAISING.pop()
        _WINDING_DOWN.clear()
        restore_handlers(previous)


CONSOLE_GONE = (errno.EPIPE, errno.EIO)  # a closed pipe (`| head`, a dead `| tee`); a hung-up terminal


class _Console:
    """A text stream whose first write to a console that went away sends the rest to os.devnull."""

    def __init__(self, stream):
        self.stream = stream
        self.gone = False

    def _lost(self, err: OSError) -> None:
        if err.errno not in CONSOLE_GONE:
            raise err
        self.gone = True
        # Whatever sits in the stream's buffer, and Python's flush at exit, go to os.devnull from
        # now on rather than failing again ("Exception ignored ... BrokenPipeError", status 120).
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor: nothing to do
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError as err:
                self._lost(err)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as err:
                self._lost(err)

    def __getattr__(self, name):  # isatty, fileno, encoding, ... for tqdm and print
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_loss_ignored():
    """Within the block, stdout and stderr survive their console going away: the lines written to
    it are lost, the job goes on (and the files it writes are complete). Every command line entry
    point runs in one (errors.cli_entry)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Console(sys.stdout), _Console(sys.stderr)
    try:
        yield
    finally:
        for console in (sys.stdout, sys.stderr):  # lines still buffered (stdout to a pipe) fail here, if at all
            if isinstance(console, _Console):
                console.flush()
        sys.stdout, sys.stderr = saved
