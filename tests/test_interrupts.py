"""Stop signals raised as interrupts, and a console that goes away (sit_fast.interrupts)."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from sit_fast.interrupts import Stopped, console_loss_ignored, exit_status, stop_signals_raise, what_stopped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGHUP"])
def test_a_stop_signal_raises_once_and_the_handlers_come_back(name, restore_handlers):
    signum = getattr(signal, name)
    signal.signal(signum, signal.SIG_DFL)
    cleaned_up = []
    with pytest.raises(Stopped) as info:
        with stop_signals_raise():
            try:
                os.kill(os.getpid(), signum)  # the handler runs as kill returns
                raise AssertionError("no Stopped raised")
            finally:  # the cleanup a stop starts is not cut short by the signal coming again
                os.kill(os.getpid(), signum)
                os.kill(os.getpid(), signal.SIGTERM)
                cleaned_up.append(True)
    assert cleaned_up and isinstance(info.value, KeyboardInterrupt)
    assert (info.value.name, exit_status(info.value), what_stopped(info.value)) == (
        name, 128 + signum, f"stopped by {name}")
    assert signal.getsignal(signum) == signal.SIG_DFL


def test_ctrl_c_keeps_its_status_and_words():
    assert (exit_status(KeyboardInterrupt()), what_stopped(KeyboardInterrupt())) == (130, "interrupted")


def test_a_signal_ignored_at_the_start_stays_ignored(restore_handlers):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    with stop_signals_raise():
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        assert callable(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


class Gone:
    """A console that went away: every write and flush fails as a closed pipe does."""

    def __init__(self, err=errno.EPIPE):
        self.err, self.calls = err, 0

    def write(self, text):
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))

    def flush(self):
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))

    def isatty(self):
        return False


@pytest.mark.parametrize("err", [errno.EPIPE, errno.EIO], ids=["closed-pipe", "hung-up-terminal"])
def test_a_console_that_went_away_costs_only_its_lines(err, monkeypatch):
    out, log = Gone(err), Gone(err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", log)
    with console_loss_ignored():
        for _ in range(3):
            print("a line", flush=True)
            print("another", file=sys.stderr, flush=True)
    assert (out.calls, log.calls) == (1, 1)  # after the first failure, nothing more is tried
    assert (sys.stdout, sys.stderr) == (out, log)


def test_other_write_errors_still_raise(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Gone(errno.ENOSPC))
    with pytest.raises(OSError) as info, console_loss_ignored():
        print("a line", flush=True)
    assert info.value.errno == errno.ENOSPC


def _with_interrupts(body: str) -> str:
    """A child's script: sit_fast/interrupts.py loaded alone (without the package's torch import) as
    `interrupts`, sys and signal imported, then `body`."""
    module = os.path.join(REPO, "sit_fast", "interrupts.py")
    return ("import atexit, importlib.util, signal, sys\n"
            f"spec = importlib.util.spec_from_file_location('interrupts', {module!r})\n"
            "interrupts = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(interrupts)\n" + body)


def signalled_child(code: str, argv: list, at: dict, timeout: float = 300) -> tuple[int, str, float | None]:
    """`python -c code ARGV...` run from the repository, sent the signal at[marker] at the first stderr line
    holding each marker, in turn (killed past `timeout` seconds): (exit status, stderr, seconds from the
    last signal sent to the exit)."""
    import threading
    import time

    child = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    watchdog = threading.Timer(timeout, child.kill)
    watchdog.start()
    lines, sent, todo = [], None, list(at.items())
    try:
        for line in child.stderr:
            lines.append(line)
            if todo and todo[0][0] in line:
                child.send_signal(todo.pop(0)[1])
                sent = time.monotonic()
        child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, "".join(lines), None if sent is None else time.monotonic() - sent


def test_a_ctrl_c_while_a_stopped_job_winds_down_ends_it_at_once_with_the_jobs_line():
    """Once a stopped job winds down (queued writes finished, its line said), the stop signals sent again
    are dropped, and another Ctrl-C ends the process at once: the job's line (what is kept) and status
    130, not a KeyboardInterrupt wherever the teardown was. A stop signal after a Ctrl-C is the same stop."""
    script = _with_interrupts("with interrupts.stop_signals_raise():\n"
                              "    try:\n"
                              "        signal.raise_signal(signal.SIGINT)\n"
                              "    except KeyboardInterrupt:\n"
                              "        signal.raise_signal(signal.SIGTERM)\n"
                              "        interrupts.winding_down('interrupted again: the files written are kept')\n"
                              "        signal.raise_signal(signal.SIGHUP)\n"
                              "        print('winding down', flush=True)\n"
                              "        signal.raise_signal(signal.SIGINT)\n"
                              "        print('not reached', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (130, "winding down\n",
                                                        "\ninterrupted again: the files written are kept\n"), out


def test_the_lines_printed_before_a_second_ctrl_c_are_not_lost():
    """A job whose output goes to a file or a pipe (a batch system's log) buffers its lines: a second
    Ctrl-C that ends it at once writes out those printed before it (what was computed, where it went),
    then the line on what is kept."""
    script = _with_interrupts("with interrupts.stop_signals_raise():\n"
                              "    try:\n"
                              "        signal.raise_signal(signal.SIGINT)\n"
                              "    except KeyboardInterrupt:\n"
                              "        interrupts.winding_down('interrupted again: the files written are kept')\n"
                              "        print('saved 3 files')\n"  # buffered: stdout is a pipe
                              "        signal.raise_signal(signal.SIGINT)\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (out.returncode, out.stdout, out.stderr) == (130, "saved 3 files\n",
                                                        "\ninterrupted again: the files written are kept\n"), out


def test_a_ctrl_c_ignored_at_the_start_stays_ignored_in_a_job():
    """A job started in the background by a shell script (`sample.py ... &`) starts with SIGINT ignored,
    so that the Ctrl-C meant for the script's foreground leaves it running: its stop handlers keep it
    ignored, and give it back ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals_raise():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # a handler would run as kill returns
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_winding_down_ends_with_the_block(restore_handlers):
    """Past the stop_signals_raise block, Ctrl-C is Python's KeyboardInterrupt again, and the next block's
    first Ctrl-C raises, whatever the last job said as it wound down, or a job's parts called on their own
    (over_batches in a test) said outside any block."""
    from sit_fast.interrupts import winding_down

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_raise():
            winding_down("interrupted again")
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is before
    winding_down("interrupted again, outside the block")
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_raise():
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_winding_down_function_is_called_at_the_second_ctrl_c(restore_handlers, monkeypatch, capfd):
    """winding_down given a function: its line is made at the second Ctrl-C (what is kept counted then), and
    one that fails (--out unreadable by then) ends the process at once all the same, with a line of its own."""
    from sit_fast.interrupts import winding_down

    class Ended(BaseException):
        pass

    def unreadable():
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "_exit", lambda status: (_ for _ in ()).throw(Ended(status)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    kept = ["no file"]
    for line, said in ((lambda: f"interrupted again: {kept[0]} kept", "interrupted again: 2 files kept"),
                       (unreadable, "interrupted again, stopping at once")):
        with pytest.raises(Ended) as ended:
            with stop_signals_raise():
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    winding_down(line)
                    kept[0] = "2 files"
                    signal.raise_signal(signal.SIGINT)
        assert ended.value.args == (130,) and capfd.readouterr().err == f"\n{said}\n"


def _stderr_of_a_child_whose_reader_is_gone(script: str) -> str:
    """The child's stderr when its stdout pipe is closed before the first line (`| head -0`); its
    exit status must be 0."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    return err


@pytest.mark.parametrize("lines", [1, 10000], ids=["buffered-till-exit", "many"])
def test_a_closed_pipe_exits_cleanly(lines):
    """Lines still buffered at the end, and Python's own flush at exit, go to os.devnull too: no
    "Exception ignored ... BrokenPipeError", status 0."""
    script = _with_interrupts("with interrupts.console_loss_ignored():\n"
                              f"    for i in range({lines}):\n"
                              "        print(i)\n"
                              "    print('kept going', file=sys.stderr)\n")
    assert _stderr_of_a_child_whose_reader_is_gone(script) == "kept going\n"


def test_lines_written_after_the_block_to_a_closed_pipe_are_lost_quietly():
    """Once the pipe is found closed, stdout itself writes to os.devnull: a line printed after the
    block (an exit hook's, a library's at exit) does not fail the job with a BrokenPipeError."""
    script = _with_interrupts("atexit.register(print, 'at exit')\n"
                              "with interrupts.console_loss_ignored():\n"
                              "    print('a line')\n"
                              "print('after the block')\n")
    assert _stderr_of_a_child_whose_reader_is_gone(script) == ""


def test_every_entry_point_outlives_its_console(monkeypatch):
    """cli_entry: lines to a console that went away are lost; the work and the exit status are not."""
    from sit_fast.errors import UserError, cli_entry

    out, log = Gone(), Gone()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", log)

    @cli_entry
    def main(fail):
        print("working")
        if fail:
            raise UserError("--flag: wrong")
        return "done"

    assert main(False) == "done"
    with pytest.raises(SystemExit) as info:
        main(True)
    assert info.value.code == 2 and (out.calls, log.calls) == (2, 2)  # one failed try per stream and call


def test_a_stop_signal_another_thread_takes_is_acted_on_once_the_hold_ends(restore_handlers):
    """The mask holds a signal only from the main thread: another thread (gloo's, CUDA's) takes it, and
    Python ran the handler at once inside the hold, in the middle of a data loader's start (half built,
    its workers then never stopped: a hang at exit). Now the handler runs when the hold ends."""
    import threading
    import time

    from sit_fast.interrupts import stop_signals_held

    # started before the hold: it blocks nothing; it waits until let go, so that it is there to take the signal
    # however long the main thread takes to send it (one that slept 1 s could be gone by then)
    let_go = threading.Event()
    other = threading.Thread(target=let_go.wait, args=(120,))
    other.start()
    inside = []
    try:
        with pytest.raises(Stopped) as info:
            with stop_signals_raise():
                with stop_signals_held():
                    signal.pthread_kill(other.ident, signal.SIGUSR1)  # as the kernel gives it to another thread
                    deadline = time.monotonic() + 0.5
                    while time.monotonic() < deadline:  # Python runs handlers between bytecodes
                        pass
                    inside.append("whole")
    finally:
        let_go.set()
        other.join()
    assert inside == ["whole"] and info.value.name == "SIGUSR1"


def test_handlers_caught_twice_are_restored_to_the_first_and_forgotten(restore_handlers):
    """A second catch (StopRequest.install again) keeps the handler it replaced first, so the restore
    puts back the process's own; a restore forgets them, so a later catch installs its handler again."""
    from sit_fast import interrupts

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    previous = {}
    first, second = (lambda signum, frame: None), (lambda signum, frame: None)
    interrupts.catch_stop_signals(first, previous)
    interrupts.catch_stop_signals(second, previous)
    assert signal.getsignal(signal.SIGTERM) is first and previous[signal.SIGTERM] == signal.SIG_DFL
    interrupts.restore_handlers(previous)
    assert previous == {} and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    interrupts.catch_stop_signals(second, previous)
    assert signal.getsignal(signal.SIGTERM) is second
    interrupts.restore_handlers(previous)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_off_the_main_thread_stop_signals_keep_their_handlers(restore_handlers):
    """Python installs handlers from the main thread only: elsewhere the blocks are no-ops, not a ValueError."""
    import threading

    from sit_fast.interrupts import stop_signals_held, stop_signals_noted

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    seen, errors = [], []

    def job():
        try:
            with stop_signals_raise(), stop_signals_noted() as noted, stop_signals_held():
                seen.append((noted, {signum: signal.getsignal(signum) for signum in before}))
        except Exception as err:  # a ValueError from signal.signal off the main thread
            errors.append(err)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert errors == [] and seen == [([], before)]


def test_a_worker_stops_holding_the_stop_signals_once_it_ignores_them():
    """Workers start with the stop signals held (stop_signals_held); ignore_stop_signals ignores them
    and ends the hold, so nothing the worker starts inherits it. Run in a child: it changes handlers."""
    script = _with_interrupts(
        "names = ('SIGTERM', 'SIGUSR1', 'SIGHUP', 'SIGINT')\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, name) for name in names])\n"
        "interrupts.ignore_stop_signals(0)\n"
        "held = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "print(sorted(name for name in names if getattr(signal, name) in held),\n"
        "      all(signal.getsignal(getattr(signal, name)) == signal.SIG_IGN for name in names))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout == "[] True\n", out.stderr


@pytest.mark.parametrize("method,started", [("fork", False), ("spawn", True), ("forkserver", True)])
def test_the_resource_tracker_starts_holding_the_stop_signals_unless_workers_fork(method, started, monkeypatch):
    """Under spawn and forkserver multiprocessing's resource tracker starts now, with the stop signals
    held (it keeps that hold for life); with fork there is none to start."""
    import multiprocessing
    from multiprocessing import resource_tracker

    from sit_fast.interrupts import start_resource_tracker

    held = []
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: method)
    monkeypatch.setattr(resource_tracker, "ensure_running",
                        lambda: held.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    start_resource_tracker()
    stop = {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT}
    assert [stop <= mask for mask in held] == ([True] if started else [])
    assert not stop & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the hold ends with the start


def test_a_command_lines_stdout_reaches_a_file_line_by_line():
    """stdout to a pipe or file (nohup, a scheduler's log) is written as each line is printed: a job's
    first lines (what it will do, where its output goes) were held in a buffer until it filled or the
    job ended, and lost with a job that was killed."""
    code = ("import os\n"
            "from sit_fast.errors import cli_entry\n"
            "@cli_entry\n"
            "def main():\n"
            "    print('sampling 50,000 images into samples/')\n"
            "    os._exit(137)\n"  # killed, as by the out-of-memory killer: no flush at exit
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = REPO
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 137 and result.stdout == "sampling 50,000 images into samples/\n", result


def test_a_stop_no_part_of_the_job_said_is_one_line_with_the_shells_status(capsys):
    """cli_entry: a Ctrl-C or stop signal before the job's own handling begins (a torchrun process
    waiting for the others to join) or after it ends: one line and 130 / 143, not a traceback."""
    from sit_fast.errors import cli_entry

    @cli_entry
    def main(stop):
        raise stop

    for stop, line, status in ((KeyboardInterrupt(), "interrupted", 130),
                               (Stopped(signal.SIGTERM), "stopped by SIGTERM", 143)):
        try:
            main(stop)
        except SystemExit as exit_info:
            code = exit_info.code
        except KeyboardInterrupt:  # let through: it would end the test session
            code = "KeyboardInterrupt"
        assert code == status and capsys.readouterr() == ("", f"{line}\n")


def test_cli_entry_gives_ctrl_c_back_its_keyboard_interrupt(monkeypatch):
    """A script ends at Ctrl-C as its libraries load (SIGINT's default action, below, which it notes);
    the job, once begun, takes Ctrl-C as KeyboardInterrupt again. A program that set SIGINT's default
    action itself, and calls a script's main, keeps it; so does a call from another thread."""
    import threading

    from sit_fast.errors import cli_entry

    @cli_entry
    def main():
        return signal.getsignal(signal.SIGINT)

    script = sys.modules["__main__"]
    saved = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        assert main() == signal.SIG_DFL  # not a script's doing
        monkeypatch.setattr(script, "sigint_quiet_while_loading", True, raising=False)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(main()))
        thread.start()
        thread.join()
        assert seen == [signal.SIG_DFL] and script.sigint_quiet_while_loading
        assert main() is signal.default_int_handler and not script.sigint_quiet_while_loading
    finally:
        signal.signal(signal.SIGINT, saved)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches the process's libraries in /proc")
@pytest.mark.parametrize("argv", [["train.py", "--help"], ["sample.py", "ODE", "--help"],
                                  ["sample_ddp.py", "ODE", "--help"], ["-m", "sit_fast.training", "--help"],
                                  ["-m", "sit_fast.latent_cache", "--help"], ["-m", "sit_fast.export", "--help"],
                                  ["-m", "sit_fast.memory", "--help"], ["-m", "sit_fast.demo", "--help"],
                                  ["-m", "sit_fast.parity", "--help"]])
def test_a_ctrl_c_while_a_script_loads_its_libraries_ends_it_without_a_traceback(argv):
    """Ctrl-C in the seconds torch takes to load: the process ends as SIGINT ends it, with no traceback
    of the import it cut short (or, were the loading done, as the job says a Ctrl-C: "interrupted").
    A `python -m sit_fast.<module>` imports the package first: it must not load torch before the module
    can say so."""
    import time

    child = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:  # torch's libraries mapped: the script's first lines ran, and the import is under way
        while "libc10" not in open(f"/proc/{child.pid}/maps").read() and time.monotonic() < deadline:
            time.sleep(0.002)
    except FileNotFoundError:  # ended already (a failure the asserts below show)
        pass
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert (child.returncode, err) in ((-signal.SIGINT, b""), (130, b"interrupted\n")), (child.returncode, err[-2000:])


def test_catch_ctrl_c_leaves_an_ignored_sigint_a_caught_one_and_other_threads_alone():
    """The one place that installs a Ctrl-C handler (stop_signals_noted, stop_signals_raise, training's stop
    request): in the main thread only, not over one it installed already, not where the process ignores
    SIGINT (a shell script's `job &`); the handler replaced goes into `previous`."""
    import threading

    from sit_fast.interrupts import catch_ctrl_c

    def handler(signum, frame):
        pass

    original = signal.getsignal(signal.SIGINT)
    try:
        previous = {}
        catch_ctrl_c(handler, previous)
        assert signal.getsignal(signal.SIGINT) is handler and previous == {signal.SIGINT: original}
        catch_ctrl_c(lambda signum, frame: None, previous)  # caught already: kept
        assert signal.getsignal(signal.SIGINT) is handler and previous == {signal.SIGINT: original}
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ignored = {}
        catch_ctrl_c(handler, ignored)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and ignored == {}
        signal.signal(signal.SIGINT, original)
        elsewhere = {}
        thread = threading.Thread(target=catch_ctrl_c, args=(handler, elsewhere))
        thread.start()
        thread.join()
        assert signal.getsignal(signal.SIGINT) is original and elsewhere == {}
    finally:
        signal.signal(signal.SIGINT, original)
