"""Loaded models and computed reviews, kept per run and reused by every request.

Loading a checkpoint takes seconds and a review tens of them, so each is done once per run (and
again only when the run's best checkpoint or export changes, as it does while a run trains).
Concurrent first requests wait for the one load instead of each starting their own; the
predictors themselves are thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transferlab.rundir.folder import RunDir


class Keyed:
    """Values computed once per key and kept while the file they came from is unchanged."""

    def __init__(self, make: Callable[[Path, str | None], Any]) -> None:
        self.make = make
        self._values: dict[tuple, tuple[int, Any]] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, run: Path, model: str | None = None) -> Any:
        key = (run, model)
        source = run / model if model else RunDir(run).best
        stamp = source.stat().st_mtime_ns if source.exists() else 0
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            held = self._values.get(key)
            if held is None or held[0] != stamp:
                self._values[key] = held = (stamp, self.make(run, model))
        return held[1]


def _predictor(run: Path, model: str | None):
    from transferlab.inference.predictor import open_predictor

    return open_predictor(run=run, model=run / model if model else None)


def _review(run: Path, _: str | None) -> dict:
    from transferlab.inference.review import review_run

    return review_run(run)


def predictors() -> Keyed:
    return Keyed(_predictor)


def reviews() -> Keyed:
    return Keyed(_review)
