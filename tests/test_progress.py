"""Progress display: tqdm on a terminal, plain timed lines in a log file."""

import io

import pytest

import sample
from sit_fast import progress as progress_module
from sit_fast.progress import LogProgress, progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_come_once_per_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=1000, desc="sampling", unit="img", file=out, interval=60, clock=clock)
    clock.now += 30
    bar.update(100)  # before the interval: nothing
    assert out.getvalue() == ""
    clock.now += 30
    bar.update(100)  # 200 in 60 s: 3.33 img/s, 800 left -> 240 s
    clock.now += 10
    bar.update(100)  # 10 s after the last line: nothing
    lines = out.getvalue().splitlines()
    assert lines == ["sampling: 200/1000 img (20%), 3.33 img/s, ETA 4m00s"]
    clock.now += 3530  # 3600 s in all
    bar.update(700)  # the end: the closing line says it, not an update line
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["sampling: 1000/1000 img (100%) in 1h00m, 0.278 img/s"]
    fast = LogProgress(total=10**6, desc="encoding", unit="img", file=out, interval=60, clock=clock)
    clock.now += 60
    fast.update(123_456)
    assert out.getvalue().splitlines()[-1] == "encoding: 123456/1000000 img (12%), 2058 img/s, ETA 7m06s"
    assert "\r" not in out.getvalue()


def test_a_short_loop_prints_nothing_and_write_goes_to_stdout(capsys):
    clock, out = Clock(), io.StringIO()
    with LogProgress(total=10, desc="encoding", unit="img", file=out, interval=60, clock=clock) as bar:
        bar.update(10)
        bar.write("rank 0: wrote shard-00000.pt")
    assert out.getvalue() == ""  # the caller reports a loop that ended within a minute
    assert capsys.readouterr().out == "rank 0: wrote shard-00000.pt\n"


def test_a_terminal_gets_tqdm_a_file_gets_lines_disabled_gets_nothing(capsys):
    tqdm = pytest.importorskip("tqdm")
    with progress(5, "x", file=Terminal()) as bar:
        assert isinstance(bar, tqdm.tqdm)
    assert isinstance(progress(5, "x", file=io.StringIO()), LogProgress)
    silent = progress(5, "x", disable=True)
    silent.update(3)
    silent.write("kept")
    silent.close()
    assert (silent.n, silent.total) == (3, 5)
    assert capsys.readouterr() == ("kept\n", "")


def test_likelihood_batches_in_a_log_are_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)  # a line at every batch
    results, interrupted = sample.over_batches("bits/dim", 6, 2, lambda index, first: [index] * 2)
    assert (results, interrupted) == ([[0, 0], [1, 1], [2, 2]], None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0].split(" in ")[0] for line in lines] == [
        "bits/dim: 2/6 item (33%)", "bits/dim: 4/6 item (67%)", "bits/dim: 6/6 item (100%)"]


def test_times_under_a_minute_are_in_seconds():
    clock, out = Clock(), io.StringIO()
    with LogProgress(total=100, desc="encoding", unit="img", file=out, interval=30, clock=clock) as bar:
        clock.now += 30
        bar.update(50)
        clock.now += 15
        bar.update(50)
    assert out.getvalue().splitlines() == ["encoding: 50/100 img (50%), 1.67 img/s, ETA 30s",
                                           "encoding: 100/100 img (100%) in 45s, 2.22 img/s"]


def test_the_interval_given_to_progress_is_kept():
    out = io.StringIO()
    with progress(3, "batches", file=out, interval=0) as bar:  # a line at every update but the last
        bar.update()
        bar.update()
        bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["batches: 1/3 it", "batches: 2/3 it", "batches: 3/3 it"]
