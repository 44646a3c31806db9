"""Progress of long steps in a log: how far, how fast and how long is left (progress.py)."""

from __future__ import annotations

import io
import re

from transferlab.progress import Lines, counted, duration


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0, 40.4, 89, 90, 900, 3300, 3599, 4800, -5)] == [
        "0 s", "40 s", "89 s", "2 min", "15 min", "55 min", "1 h 0 min", "1 h 20 min", "0 s",
    ]  # fmt: skip


def test_a_log_gets_lines_with_the_share_done_the_rate_and_the_time_left(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 40.0])  # start, then one reading per update
    monkeypatch.setattr("transferlab.progress.time.perf_counter", lambda: next(clock))
    log = io.StringIO()
    lines = Lines(1000, "frozen backbone, once", "images", log, every=15)
    lines.update(100)  # at 10 s: not yet (every 15 s)
    lines.update(100)  # at 20 s: 200 done at 10 a second, 800 left: 80 s
    lines.update(800)  # at 40 s: all done, nothing more to say
    assert log.getvalue().splitlines() == [
        "frozen backbone, once: 200 of 1,000 images (20%), 10 images/s, about 80 s left"
    ]


def test_counted_passes_every_item_through_and_reports_in_a_log():
    log = io.StringIO()  # not a terminal: lines, no bar
    batches = [list(range(3))] * 5
    assert list(counted(iter(batches), 15, "decoding", stream=log, every=0)) == batches
    said = log.getvalue().splitlines()
    assert len(said) == 4  # after each batch but the last (done: nothing left to estimate)
    assert re.fullmatch(r"decoding: 3 of 15 images \(20%\), [\d,]+ images/s, about \d+ s left", said[0])
    assert said[-1].startswith("decoding: 12 of 15 images (80%)")
