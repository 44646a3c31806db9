"""Side concerns of training, as Lightning callbacks: the epoch history with its checkpoints, and live curves.

Only the global-rank-0 process writes into the run directory.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

import lightning.pytorch as pl

from transferlab.errors import UserError
from transferlab.files import atomic_path, commit
from transferlab.progress import duration
from transferlab.rundir.folder import RunDir


def best_key(row: dict) -> tuple[float, float]:
    """What "best" means everywhere: higher val accuracy (with several labels per image: higher mean average
    precision), then lower val loss."""
    return row.get("val_map", row["val_accuracy"]), -row["val_loss"]


def best_metric(multi_label: bool) -> str:
    """The validation figure ``best_key`` ranks by first (and early stopping watches)."""
    return "val_map" if multi_label else "val_accuracy"


def perfect(scores: dict) -> bool:
    """Whether an epoch got every validation image right (with several labels, mean average precision 1): no later
    epoch can rank above it on the figure ``best_key`` ranks by first. ``scores``: the validation's figures as
    computed (a history row's are rounded to 6 places: 2 million images with one wrong would read as perfect)."""
    return scores.get("val_map", scores["val_accuracy"]) >= 1.0


def better(row: dict, than: list[dict]) -> bool:
    """Whether ``row`` beats every row of ``than`` (and so becomes best.ckpt)."""
    return not than or best_key(row) > max(map(best_key, than))


class EpochRecorder(pl.Callback):
    """After each epoch: one history row (the run's one record of epochs), last.ckpt, and best.ckpt if better.

    Written by hand rather than with ModelCheckpoint because the best model spans both phases
    (two Trainers) and every file must be replaced atomically.
    """

    def __init__(
        self, rd: RunDir, phase: str, offset: int, history: list[dict], on_best: Callable[[], None] = lambda: None,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.rd, self.phase, self.offset, self.history, self.on_best = rd, phase, offset, history, on_best
        self.on_checkpoint = on_checkpoint  # rank 0's, once, after the first checkpoint (the --overwrite swap)
        self.first = True
        self.started, self.lr = 0.0, 0.0
        self.val_images = 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.started = time.perf_counter()
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # what this epoch trains at (a schedule steps after)

    def on_train_epoch_end(self, trainer, module) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "epoch": self.offset + trainer.current_epoch + 1,
            "phase": self.phase,
            "train_loss": round(m["train_loss"], 6),
            "train_accuracy": round(m["train_accuracy"], 6),
            "val_loss": round(m["val_loss"], 6),
            "val_accuracy": round(m["val_accuracy"], 6),
            "lr": self.lr,
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        if "val_map" in m:
            row["val_map"] = round(m["val_map"], 6)
        self.val_images = int(m["val_images"])
        self._record(trainer, row, last=True)
        if self.first:  # only rank 0 knows whether it swaps: the others learn it, and wait while it does
            self.first = False
            if trainer.strategy.broadcast(self.on_checkpoint is not None, src=0):
                if trainer.is_global_zero:
                    self.on_checkpoint()
                trainer.strategy.barrier()  # the others read the feature cache only once it is back in place

    def record_start(self, trainer, row: dict) -> None:
        """The head a phase starts from, scored before its first epoch (the closed-form head, epoch 0): a history
        row, and best.ckpt when it is the best so far; no last.ckpt (no epoch of the phase has run)."""
        self.val_images = int(trainer.callback_metrics.get("val_images", 0))
        self._record(trainer, row, last=False)

    def _record(self, trainer, row: dict, last: bool) -> None:
        improved = better(row, self.history)
        self.history.append(row)
        if improved:
            self.on_best()
        if not (last or improved):
            if trainer.is_global_zero:
                self.rd.write_history(self.history)
            return
        tmp = self.rd.checkpoints / ".last.ckpt.tmp"
        try:
            trainer.save_checkpoint(tmp, weights_only=not last)  # every rank takes part; rank 0 writes
            if trainer.is_global_zero:
                # the row first: a kill between the two leaves a row past last.ckpt, which a resume trims
                self.rd.write_history(self.history)
                if improved:
                    with atomic_path(self.rd.best) as best:
                        shutil.copyfile(tmp, best)
                if last:
                    commit(tmp, self.rd.last)
                else:
                    tmp.unlink()
        except BaseException as e:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial checkpoint behind
            if isinstance(e, RuntimeError) and "write" in str(e):  # torch.save's own words for a failed write
                raise UserError(
                    f"cannot write the checkpoint {self.rd.last} ({str(e).splitlines()[0][:100]}): check that the "
                    f"disk has free space (df -h) and the folder is writable, then resume with --resume {self.rd.path}"
                ) from None
            raise

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint["transferlab"] = {"phase": self.phase, "offset": self.offset}


class LiveCurves(pl.Callback):
    """curves.png redrawn while a run trains (at most every ``every`` seconds), so progress can be watched.

    The first drawing waits until ``every`` seconds into the phase: a phase shorter than that is drawn
    once, by the finish, and does not pay for a figure nobody had time to look at.
    """

    def __init__(self, rd: RunDir, history: list[dict], title: str, every: float = 15.0) -> None:
        self.rd, self.history, self.title, self.every = rd, history, title, every
        self.drawn = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.is_global_zero and time.perf_counter() - self.drawn >= self.every:
            from transferlab.rundir.plots import plot_curves

            plot_curves(self.history, self.rd.path / "curves.png", self.title)
            self.drawn = time.perf_counter()


PHASES = {"head": "closed-form head", "feature_extraction": "feature extraction", "fine_tune": "fine-tuning"}


class EpochLines(pl.Callback):
    """One line per epoch where no progress bar shows (a log, a benchmark's child): the epoch's figures, and the
    phase's time left, from the mean epoch so far (no later than ``left()`` seconds when a budget ends it sooner).

        fine-tuning: epoch 2 of 10, train accuracy 0.912, val accuracy 0.934 in 9 min; about 72 min left
    """

    def __init__(self, phase: str, left: Callable[[], float] | None = None, stream: TextIO | None = None) -> None:
        self.phase, self.left, self.stream = PHASES.get(phase, phase), left, stream
        self.began, self.started, self.epochs = 0.0, 0.0, 0  # the epochs this process ran (a resume runs fewer)

    def on_train_start(self, trainer, module) -> None:
        self.began = time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        stream = self.stream or sys.stderr
        if not trainer.is_global_zero or (self.stream is None and stream.isatty()):
            return
        now, m = time.perf_counter(), trainer.callback_metrics
        done, planned = trainer.current_epoch + 1, trainer.max_epochs
        self.epochs += 1
        left = (planned - done) * (now - self.began) / self.epochs
        if self.left is not None:
            left = min(left, max(0.0, self.left()))
        val = f"val mAP {float(m['val_map']):.3f}" if "val_map" in m else f"val accuracy {float(m['val_accuracy']):.3f}"
        print(
            f"{self.phase}: epoch {done} of {planned}, train accuracy {float(m['train_accuracy']):.3f}, {val} in "
            f"{duration(now - self.started)}; about {duration(left)} left",
            file=stream,
            flush=True,
        )
