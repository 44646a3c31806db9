"""Progress of the long steps with the time left: tqdm's bar on a terminal, a plain line now and then in a log.

A run on 60,000 images spends minutes in each step; a terminal shows tqdm's bar (its estimate included), and a
log (``train ... 2> log``, a benchmark's child, a batch job) gets one line every ``every`` seconds instead of
nothing or a carriage-return smear:

    frozen backbone, once: 12,032 of 50,000 images (24 %), 43 images/s, about 15 min left
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
# seconds between two lines in a log; the web app's training jobs ask for 2 (serve/jobs.py)
EVERY = float(os.environ.get("TRANSFERLAB_PROGRESS_SECONDS") or 30)


def duration(seconds: float) -> str:
    """A time span as a person says it: "40 s", "15 min", "1 h 20 min"."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class Lines:
    """A count towards ``total`` that says, every ``every`` seconds, how far it is, how fast and how long is left."""

    def __init__(self, total: int, what: str, unit: str, stream: TextIO | None = None, every: float = EVERY) -> None:
        self.total, self.what, self.unit, self.every = total, what, unit, every
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.said = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.said >= self.every and self.done < self.total:
            self.said = now
            self.say(now)

    def say(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        print(
            f"{self.what}: {self.done:,} of {self.total:,} {self.unit} ({self.done / max(self.total, 1):.0%}), "
            f"{rate:,.0f} {self.unit}/s, about {duration(left)} left",
            file=self.stream,
            flush=True,
        )


def counted(
    items: Iterable[T], total: int, what: str, unit: str = "images", size=len, stream: TextIO | None = None,
    every: float = EVERY,
) -> Iterator[T]:  # fmt: skip
    """``items`` as they come, with progress towards ``total`` ``unit`` (``size(item)`` each): tqdm's bar on a
    terminal, else a ``Lines`` line every ``every`` seconds."""
    stream = stream or sys.stderr
    if stream.isatty():
        with tqdm(total=total, desc=what, unit=f" {unit}", leave=False, file=stream) as bar:
            for item in items:
                yield item
                bar.update(size(item))
        return
    lines = Lines(total, what, unit, stream, every)
    for item in items:
        yield item
        lines.update(size(item))
