"""Loaded models and computed reviews, kept per run and reused by every request.

Loading a checkpoint takes seconds and a review tens of them, so each is done once per run (and
again only when the run's best checkpoint or export changes, as it does while a run trains).
Concurrent first requests wait for the one load instead of each starting their own; the
predictors themselves are thread-safe. A review is computed in the background (``Background``):
its page answers at once with what it is doing and reloads when the review is ready.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transferlab.errors import UserError
from transferlab.rundir.folder import RunDir


def _stamp(run: Path, model: str | None) -> int:
    source = run / model if model else RunDir(run).best
    return source.stat().st_mtime_ns if source.exists() else 0


class Keyed:
    """Values computed once per key and kept while the file they came from is unchanged."""

    def __init__(self, make: Callable[[Path, str | None], Any]) -> None:
        self.make = make
        self._values: dict[tuple, tuple[int, Any]] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, run: Path, model: str | None = None) -> Any:
        key, stamp = (run, model), _stamp(run, model)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            held = self._values.get(key)
            if held is None or held[0] != stamp:
                self._values[key] = held = (stamp, self.make(run, model))
        return held[1]


class Background:
    """Per run, a value computed in a thread: ``get`` starts it (again once the best checkpoint changed) and
    answers at once with ``{"state": "working" | "ready" | "failed", "step", "elapsed_s", "value" | "error"}``."""

    def __init__(self, make: Callable[[Path, Callable[[str], None]], Any]) -> None:
        self.make = make
        self._work: dict[Path, dict] = {}
        self._guard = threading.Lock()

    def get(self, run: Path) -> dict:
        stamp = _stamp(run, None)
        with self._guard:
            held = self._work.get(run)
            if held is None or (held["stamp"] != stamp and held["state"] != "working"):
                held = {"stamp": stamp, "state": "working", "step": "starting", "began": time.time()}
                self._work[run] = held
                threading.Thread(target=self._compute, args=(run, held), daemon=True).start()
        return {**held, "elapsed_s": round((held.get("ended") or time.time()) - held["began"], 1)}

    def _compute(self, run: Path, held: dict) -> None:
        try:
            held["value"] = self.make(run, lambda what: held.__setitem__("step", what))
            held["state"] = "ready"
        except UserError as e:
            held["error"], held["state"] = str(e).splitlines()[0], "failed"
        except Exception as e:  # shown on the page rather than lost in a thread
            held["error"], held["state"] = f"the review failed: {type(e).__name__}: {e}".splitlines()[0], "failed"
        held["ended"] = time.time()


def _predictor(run: Path, model: str | None):
    from transferlab.inference.predictor import open_predictor

    return open_predictor(run=run, model=run / model if model else None)


def _review(run: Path, step: Callable[[str], None]) -> dict:
    from transferlab.inference import review

    return review.review_run(run, step=step)


def predictors() -> Keyed:
    return Keyed(_predictor)


def reviews() -> Background:
    return Background(_review)
