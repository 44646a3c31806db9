"""The transfer recipe end to end: a checked Setup (plan.py), then the run directory, phase 1, phase 2, finish.

Under DDP every process runs this file; only global rank 0 writes the run directory.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from transferlab.config import TrainConfig
from transferlab.data.datamodule import TransferData
from transferlab.errors import Interrupted, UserError
from transferlab.files import atomic_write
from transferlab.recipe.budget import Budget, StopAtDeadline, plan_run
from transferlab.recipe.callbacks import EpochLines, EpochRecorder, LiveCurves, best_metric, perfect
from transferlab.recipe.head_init import ClosedFormHead
from transferlab.recipe.module import TransferModule
from transferlab.recipe.plan import Setup, is_rank_zero, lightning_trainer, prepare, run_path
from transferlab.rundir.folder import Replacement, RunDir, net_state, read_checkpoint, recover
from transferlab.rundir.locks import RunLock

log = logging.getLogger("transferlab")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners or tips
for _pattern in (
    ".*module\\(s\\) in eval mode.*",
    ".*LeafSpec.*",
    ".*smaller than the logging interval.*",
    ".*all_gather is deprecated.*",  # Lightning's own call, when DDP processes share out extraction
):
    warnings.filterwarnings("ignore", _pattern)  # frozen groups are in eval mode on purpose


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    text = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate" in text


@contextmanager
def memory_advice(batch_size: int, phase: str):
    """Out of memory anywhere in a phase (extraction included) becomes the advice that helps."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise UserError(
            f"out of memory with --batch-size {batch_size} ({phase}): retry with a smaller --batch-size "
            f"(e.g. {max(1, batch_size // 2)}) or a smaller --image-size"
        ) from None


class Recipe:
    """Runs a checked Setup: the run directory, feature extraction, fine-tuning, the finish."""

    def __init__(self, setup: Setup, lock: RunLock | None = None) -> None:
        self.s = setup
        self.lock = lock or RunLock()  # the run directory's lock, held from start (or earlier) to the finish
        # --overwrite of a folder holding a run: rank 0 builds the new one beside it (the others write nothing)
        replacing = is_rank_zero() and not setup.resuming and setup.rd.holds_run()
        self.replacement = Replacement(setup.rd) if replacing else None
        root = Path(setup.cfg.cache_dir) if setup.cfg.cache_dir else setup.rd.path / "cache"
        digest = setup.weights.digest() if setup.weights else f"random:{setup.cfg.seed}"
        self.data = TransferData(setup, digest, root)
        self.best_state: dict | None = None  # the best weights seen by this process, so phase 2 needs no file
        self.val_images = 0
        self._resumed_rows = 0  # history rows trained before a resume, whose seconds count too
        self.budget = Budget(setup.budget_seconds) if setup.budget_seconds else None
        self.speed: dict[str, float] = {}  # images per second through the frozen backbone, measured for the budget
        self.processes = 1
        self.at_head = False  # the run stopped at its closed-form head (epoch 0), which no epoch could beat

    def train(self) -> dict | None:
        """Phase 1 then phase 2, resuming from last.ckpt when there is one; returns metrics.json (rank 0)."""
        with self.lock, guarded(self.replacement, self.s.rd):
            return self._train()

    def _train(self) -> dict | None:
        s, cfg = self.s, self.s.cfg
        began = time.perf_counter()
        resume = resume_point(s) if s.resuming else None
        self._resumed_rows = len(s.history) if resume else 0
        if self.budget:  # the size and views to cache (a resumed run keeps them)
            self.speed = plan_run(self.budget, s, self.data.frozen_speed)
        self.start(fresh=not s.resuming)
        phase, ckpt = resume or ("feature_extraction", None)
        if phase == "feature_extraction" and cfg.epochs > 0:
            self.feature_extraction(cfg.epochs, cfg.lr, ckpt)
            ckpt = None
        if self.at_head:  # nothing to fine-tune, nor to plan: the budget's plan says no fine-tuning was planned
            epochs = 0
        elif self.budget:
            epochs = self.budget.fine_tuning_epochs(s, self.speed, ckpt)
        else:
            epochs = cfg.fine_tune_epochs
        if epochs > 0:
            self.fine_tune(epochs, s.fine_tune_lr, ckpt)
        return self.finish(began)

    def start(self, fresh: bool = True) -> None:
        """The run directory: cleared of an earlier run (only now, after every check) and the config written.

        An earlier run is not cleared but replaced: the new one starts beside it (``Replacement``).
        """
        if is_rank_zero():
            lock_run(self.lock, self.replacement.target if self.replacement else self.s.rd.path, "train")
            if fresh and self.replacement and not self.replacement.pending:
                self.replacement.begin()
            start_directory(self.s, fresh)

    def _swap(self) -> None:
        """After the first checkpoint of a run that replaces another (rank 0): ``Replacement.complete``."""
        if self.replacement and self.replacement.pending:
            self.replacement.complete()

    def feature_extraction(self, epochs: int, lr: float, ckpt: Path | None = None) -> None:
        """Phase 1: the whole backbone frozen (BatchNorm in inference mode), the head trains."""
        self.s.net.freeze(len(self.s.net.groups))
        self._phase("feature_extraction", epochs, 0, lr, ckpt)

    def fine_tune(self, epochs: int, lr: float, ckpt: Path | None = None) -> None:
        """Phase 2: from the best head so far, the groups from ``fine_tune_at`` on train too, the count continues."""
        s = self.s
        if ckpt is None and s.history:
            self._load_best()
        s.net.freeze(s.fine_tune_at, s.cfg.train_bn)
        p1_epochs = sum(r["phase"] == "feature_extraction" for r in s.history)
        self._phase("fine_tune", epochs, p1_epochs, lr, ckpt)

    def finish(self, began: float) -> dict | None:
        """The best weights back in the network; evaluation, metrics.json and the report (rank 0)."""
        s = self.s
        s.timings.update(
            self.data.timings,
            extracted_per_process=self.data.extracted_per_process,
            extract_precision=self.data.extract_precision,
        )
        s.timings["train_seconds"] = (
            time.perf_counter() - began + sum(r["seconds"] for r in s.history[: self._resumed_rows])
        )
        if self.budget:
            s.notes["time_budget"] = {**self.budget.plan, "spent_before_finish_seconds": self.budget.spent()}
        if not is_rank_zero():
            return None
        self._swap()  # a run that ended before any epoch still replaces the old one now
        self._load_best()
        from transferlab.recipe.finish import finish_run

        metrics = finish_run(s, self.val_images, self.processes)
        self.lock.release()
        return metrics

    def _phase(self, phase: str, epochs: int, offset: int, lr: float, ckpt: Path | None) -> None:
        s, cfg = self.s, self.s.cfg
        start, fine_tuning = self.data.use(phase), phase == "fine_tune"
        # dropout and view draws start from the seed, whether the cache was just filled or hit
        pl.seed_everything(cfg.seed + fine_tuning, verbose=False)
        module = TransferModule(
            s.net, start, lr, cfg.optimizer, len(s.data.classes), s.class_weights, cfg.label_smoothing,
            mixup=cfg.mixup if fine_tuning else 0.0, schedule=cfg.fine_tune_schedule if fine_tuning else "constant",
            multi_label=cfg.multi_label,
        )  # fmt: skip
        swap = self._swap if self.replacement and self.replacement.pending else None
        recorder = EpochRecorder(s.rd, phase, offset, s.history, on_best=self._keep_best, on_checkpoint=swap)
        callbacks: list[pl.Callback] = [recorder, LiveCurves(s.rd, s.history, s.spec.name)]
        closed_form = None
        # not with BatchNorm in training mode (an ablation): the head would be fitted to features training never sees
        if phase == "feature_extraction" and ckpt is None and cfg.head_init == "lbfgs" and cfg.bn_mode != "train":
            closed_form = ClosedFormHead(cfg.seed)  # the head starts at the optimum of the frozen features
            callbacks.insert(0, closed_form)
        if cfg.patience:
            callbacks.append(EarlyStopping(best_metric(cfg.multi_label), mode="max", patience=cfg.patience))
        if self.budget:
            most = cfg.fine_tune_epochs if fine_tuning else 0  # fine-tuning's epochs planned again as they go
            deadline = StopAtDeadline(self.budget, phase, self.budget.keep_for(s, self.speed, phase), most)
            callbacks.insert(callbacks.index(recorder), deadline)  # before it: last.ckpt gets the new plan
        callbacks.append(EpochLines(phase, self.budget.left if self.budget else None))
        trainer = lightning_trainer(cfg, epochs, callbacks)
        began = time.perf_counter()
        with memory_advice(cfg.batch_size, phase):
            if closed_form is not None:  # scored first, as epoch 0: no run ends below the head it starts from
                scores = trainer.validate(module, datamodule=self.data, verbose=False)[0]
                recorder.record_start(trainer, closed_form.row(scores))
                if cfg.patience and perfect(scores):  # patience, with certainty: no epoch can beat it (unrounded)
                    self.at_head = True
                    s.notes["stopped_at_head"] = "the closed-form head got every validation image right"
            if not self.at_head:
                trainer.fit(module, datamodule=self.data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        s.timings[f"{phase}_seconds"] = time.perf_counter() - began
        if closed_form is not None:
            s.notes["head_fit"] = closed_form.report
        self.val_images = recorder.val_images or self.val_images
        self.processes = trainer.world_size

    def _keep_best(self) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.s.net.state_dict().items()}

    def _load_best(self) -> None:
        state = self.best_state
        if state is None:  # the best epoch came before a resume: it is only in best.ckpt
            state = net_state(read_checkpoint(self.s.rd.best))
        self.s.net.load_state_dict(state)


def resume_point(s: Setup) -> tuple[str, Path] | None:
    """Phase and checkpoint to continue from; trims history rows past the checkpoint."""
    rd = s.rd
    if not rd.last.is_file():
        return None
    ckpt = read_checkpoint(rd.last)
    info = ckpt.get("transferlab", {})
    done = info.get("offset", 0) + int(ckpt.get("epoch", 0)) + 1
    s.history[:] = [r for r in rd.read_history() if r["epoch"] <= done]
    log.info("resuming %s from epoch %d", rd.path, done)
    return info.get("phase", "feature_extraction"), rd.last


@contextmanager
def guarded(replacement: Replacement | None, rd: RunDir) -> Iterator[None]:
    """A failure or Ctrl-C before the first checkpoint leaves the old run as it was; Ctrl-C is one line."""
    try:
        yield
    except BaseException as e:
        replaced = replacement is not None and replacement.pending
        if replacement:
            replacement.abandon()
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):  # Lightning answers Ctrl-C with exit(1)
            raise
        if replaced:
            why = f"{rd.path} still holds the previous run, untouched"
        elif rd.last.is_file():
            why = f"continue it with `transferlab train --resume {rd.path}`"
        else:
            why = "before the first epoch ended, so there is nothing to resume: start it again"
        raise Interrupted(f"interrupted: {why}") from None


def lock_run(lock: RunLock, path: Path, what: str) -> None:
    """Take ``path``'s lock unless ``lock`` holds it (rank 0 only), then tidy what a killed swap left beside it."""
    if is_rank_zero() and not lock.held:
        lock.take(path, what)
        recover(path)


def start_directory(s: Setup, fresh: bool) -> None:
    """List skipped files, draw augmentations, write config (a fresh run's folder holds no earlier run's outputs:
    those stay in the folder a ``Replacement`` swaps out)."""
    if fresh:
        s.rd.checkpoints.mkdir(parents=True, exist_ok=True)
        _report_skipped(s)
        from transferlab.rundir.plots import plot_augmentations

        cfg = s.cfg
        plot_augmentations(s.data, s.spec, s.size, cfg.augment, cfg.resize, s.rd.path / "augmentations.png")
    s.rd.write_config(s.config_dict())


def _report_skipped(s: Setup) -> None:
    skipped = s.data.skipped
    if not skipped:
        return
    listing = s.rd.path / "skipped_files.txt"
    atomic_write(listing, "".join(f"{path}\t{why}\n" for path, why in skipped))
    first = "; ".join(f"{path} ({why})" for path, why in skipped[:3])
    warnings.warn(
        f"{len(skipped)} file(s) are not readable images and were skipped: {first}"
        f"{' ...' if len(skipped) > 3 else ''}; full list in {listing}",
        stacklevel=3,
    )


def train(
    cfg: TrainConfig | None = None, *, resume: str | Path | None = None, overwrite: bool = False, **options
) -> dict | None:
    """Train on a folder (``train(TrainConfig(data_dir=...))`` or ``train(data_dir=...)``), or resume a run.

    Returns the run's metrics.json (None in DDP processes other than global rank 0).
    """
    lock = RunLock()  # taken first: a second command on the same folder is refused before any work
    with lock:
        if resume is not None:
            rd = RunDir(resume)
            rd.read_config()  # a folder that is not a run is refused before anything is made beside it
            lock_run(lock, rd.path, "train --resume")
            if rd.finished():
                raise UserError(f"{rd.path} is already finished: nothing to resume (see {rd.metrics})")
            cfg = TrainConfig.from_dict({**rd.read_config(), "out": str(rd.path)})
            return Recipe(prepare(cfg, resume=True), lock).train()
        cfg = cfg or TrainConfig(**options)
        cfg.check()
        lock_run(lock, run_path(cfg), "train")
        return Recipe(prepare(cfg, overwrite=overwrite), lock).train()
