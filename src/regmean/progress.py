"""Progress of long work: a live bar on a terminal; elsewhere (logs, CI, a pipe) plain lines at a sensible rate, so
that a log shows how far a run got and how long it has left."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_SECONDS = 60.0
"""Without a terminal: a line at least this often while work advances..."""
PLAIN_FRACTION = 0.1
"""...and whenever another tenth of the work is done..."""
PLAIN_QUIET = 10.0
"""...but none in a run's first seconds (short work says nothing more than its result)."""


@contextmanager
def progress(label: str, unit: str, total: int, done: int = 0, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A function to call with each amount of work done (out of `total`, `done` already): a bar on a terminal,
    plain lines otherwise ('merging: 40/98 steps, 0:12:31 elapsed, about 0:18:10 left'), nothing if not `enabled`."""
    if not enabled:
        yield lambda n=1: None
    elif Console().is_terminal:
        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
        with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task(label, total=total, completed=done)
            yield lambda n=1: bar.advance(task, n)
    else:
        lines = PlainLines(label, unit, total, done)
        yield lines.advance
        lines.finish()


class PlainLines:
    """Progress as plain lines on stderr."""

    def __init__(self, label: str, unit: str, total: int, done: int):
        self.label, self.unit, self.total, self.done = label, unit, total, done
        self.start = self.last_time = time.monotonic()
        self.first, self.last_done = done, done
        self.said = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start < PLAIN_QUIET:
            return
        if now - self.last_time >= PLAIN_SECONDS or self.done - self.last_done >= PLAIN_FRACTION * self.total:
            self._say(now)
            self.said = True

    def finish(self) -> None:
        if self.said and self.done != self.last_done:
            self._say(time.monotonic())

    def _say(self, now: float) -> None:
        elapsed, here = now - self.start, self.done - self.first
        left = elapsed / here * (self.total - self.done) if here > 0 and self.done < self.total else None
        estimate = f", about {_clock(left)} left" if left is not None else ""
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit}, {_clock(elapsed)} elapsed{estimate}",
            file=sys.stderr,
            flush=True,
        )
        self.last_time, self.last_done = now, self.done


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
