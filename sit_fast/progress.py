"""Progress of long loops: a tqdm bar on a terminal, a plain line now and then in a log file.

A tqdm bar redrawn into a file (a SLURM or nohup log) leaves a carriage-return-separated frame per
redraw; `progress` instead prints "desc: n/total unit (p%), rate, ETA" at most once per `interval`
seconds, and a closing line after those, which reads well in a log and stays small.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL = 60.0  # seconds between the lines written to a file


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LogProgress:
    """The part of tqdm's interface used here (update, write, close, n, a context manager), as lines."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, interval: float = LOG_INTERVAL,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n = 0
        self.clock = clock
        self.start = self.last = clock()
        self.closed = self.printed = False

    def _line(self, final: bool) -> str:
        elapsed = self.clock() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s"
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        if final:
            return text + f" in {duration(elapsed)}" + (f", {speed}" if rate else "")
        if rate > 0:
            text += f", {speed}, ETA {duration(max(self.total - self.n, 0) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval and self.n < self.total:
            self.last, self.printed = now, True
            print(self._line(final=False), file=self.file, flush=True)

    def write(self, message: str) -> None:  # to stdout, as tqdm.write
        print(message, flush=True)

    def close(self) -> None:
        """The closing line, when a line came before it (a short loop's caller reports it itself)."""
        if not self.closed:
            self.closed = True
            if self.printed:
                print(self._line(final=True), file=self.file, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(LogProgress):
    """A disabled bar: counts, and prints write()'s messages only."""

    def __init__(self, total: int):
        self.n, self.total = 0, total

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "it", disable: bool = False, file: TextIO | None = None,
             interval: float | None = None):
    """A progress display for a loop of `total` units: tqdm on a terminal, LogProgress elsewhere
    (a line every `interval` seconds, LOG_INTERVAL by default)."""
    if disable:
        return _Silent(total)
    file = file if file is not None else sys.stderr
    if file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True)
    return LogProgress(total, desc, unit, file, LOG_INTERVAL if interval is None else interval)
