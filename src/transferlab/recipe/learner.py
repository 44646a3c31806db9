"""The recipe one step at a time, for learners: the Keras tutorial's steps as methods of a ``Learner``.

``Learner`` is a thin driver of the same ``prepare`` and ``Recipe`` that ``train`` runs, so a
learner who takes the steps in the tutorial's order gets exactly what ``train`` gives with the
same options and seed (tests/test_steps.py checks it epoch by epoch). Each step only records a
choice or calls one public step of ``Recipe``: no training code lives here.

    learner = Learner("photos", image_size=96)   # 1. the backbone without its top
    learner.freeze()                             # 2. frozen, BatchNorm in inference mode
    learner.augment("keras")                     # 3. augmentation of training images
    learner.head(dropout=0.2)                    # 4. pooling, dropout, one dense layer
    learner.fit(epochs=5)                        # 5. feature extraction
    learner.unfreeze(at=0.65)                    # 6. the top of the backbone trainable again
    learner.fit(epochs=5)                        #    fine-tuning, continuing the epoch count
    metrics = learner.finish()                   # 7. evaluation, curves, report
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from torch import nn

from transferlab.config import TrainConfig
from transferlab.errors import UserError
from transferlab.model.network import resolve_fine_tune_at
from transferlab.recipe.plan import prepare
from transferlab.recipe.training import Recipe


class Learner:
    """One run built step by step; the run directory holds the same files as one from ``train``."""

    def __init__(self, data_dir: str | Path, *, overwrite: bool = False, **options) -> None:
        """Step 1: check the data and options, and load the backbone without its top (nothing is written yet).

        ``options`` are those of ``TrainConfig``; the epochs and learning rates come with each ``fit``.
        """
        if options.get("time_budget"):
            raise UserError("--time-budget plans a whole run: use train(), not the step-by-step Learner")
        self.recipe = Recipe(prepare(TrainConfig(data_dir=str(data_dir), **options), overwrite=overwrite))
        self.setup = self.recipe.s
        self.trainable_from = 0  # like a freshly loaded Keras base: trainable until frozen
        self.phases: list[str] = []
        self.began = 0.0
        self.metrics: dict | None = None
        self._apply()

    @property
    def base(self) -> nn.ModuleList:
        """The backbone without its top, as its layer groups (bottom to top): what ``unfreeze(at)`` counts."""
        return self.setup.net.groups

    @property
    def history(self) -> list[dict]:
        """One row per epoch so far (as history.csv): phase, train/val loss and accuracy, lr, seconds."""
        return self.setup.history

    @property
    def run_dir(self) -> Path:
        return self.setup.rd.path

    def freeze(self) -> Learner:
        """Step 2: no backbone weight trains; its BatchNorm layers stay in inference mode (``training=False``)."""
        self.trainable_from = len(self.base)
        return self._apply()

    def augment(self, kind: str = "keras") -> Learner:
        """Step 3: how training images are varied (keras: flip, rotation, zoom; none; strong); not validation's."""
        self._before_training("augment()")
        return self._set(augment=kind)

    def head(self, dropout: float = 0.2) -> Learner:
        """Step 4: global average pooling, dropout, one dense layer (one logit with a sigmoid for two classes)."""
        self._before_training("head()")
        self._set(dropout=dropout)
        self.setup.net.head[0].p = dropout
        return self

    def unfreeze(self, at: int | float | str | None = None, train_bn: bool = False) -> Learner:
        """Step 6: layer groups from ``at`` on train again (an index, or a fraction of the backbone; default 0.65).

        BatchNorm stays in inference mode unless ``train_bn``: its statistics were learned on ImageNet's
        millions of images, and a few small batches would overwrite them.
        """
        self.trainable_from = resolve_fine_tune_at(at, len(self.base))
        self._set(fine_tune_at=None if at is None else str(at), train_bn=train_bn)
        return self._apply()

    def fit(self, epochs: int, lr: float | None = None) -> list[dict]:
        """Steps 5 and 6: train for ``epochs``; returns their history rows.

        With the backbone frozen it is feature extraction (default lr: ``lr`` option, 1e-3); after
        ``unfreeze`` it is fine-tuning from the best head so far, continuing the epoch count, at a tenth
        of that unless ``lr`` is given. Each phase runs once, in that order, as in the tutorial.
        """
        phase = "feature_extraction" if self.trainable_from == len(self.base) else "fine_tune"
        if self.metrics is not None:
            raise UserError("this Learner has finished: make a new Learner to train again")
        if phase in self.phases or "fine_tune" in self.phases:
            raise UserError(
                f"{phase.replace('_', ' ')} after {' then '.join(self.phases).replace('_', ' ')}: "
                "a Learner fits once frozen, then once after unfreeze()"
            )
        cfg, first = self.setup.cfg, len(self.history)
        if phase == "feature_extraction":
            self._set(epochs=epochs, lr=cfg.lr if lr is None else lr, fine_tune_epochs=0)
        else:
            at = cfg.fine_tune_at  # as unfreeze() gave it; never frozen: every group trains
            at = at if resolve_fine_tune_at(at, len(self.base)) == self.trainable_from else str(self.trainable_from)
            self._set(
                epochs=cfg.epochs if self.phases else 0, fine_tune_epochs=epochs, fine_tune_at=at,
                fine_tune_lr=cfg.fine_tune_lr if lr is None else lr,
            )  # fmt: skip
            self.setup.fine_tune_at = self.trainable_from
        if not self.phases:
            self.began = time.perf_counter()
            self.recipe.start(fresh=True)
        self.phases.append(phase)
        if phase == "feature_extraction":
            self.recipe.feature_extraction(epochs, cfg.lr)
        else:
            self.recipe.fine_tune(epochs, self.setup.fine_tune_lr)
        return self.history[first:]

    def finish(self) -> dict | None:
        """Step 7: the best epoch's weights back, evaluated on the held-out images; metrics, curves and report."""
        if not self.phases:
            raise UserError("nothing trained yet: call fit() before finish()")
        if self.metrics is None:
            self.recipe.start(fresh=False)  # config.yaml records the epochs the steps ran
            self.metrics = self.recipe.finish(self.began)
        return self.metrics

    def summary(self) -> dict:
        """What trains now: parameter counts and which layer groups are frozen."""
        net = self.setup.net
        return {
            "backbone": self.setup.spec.name,
            "image_size": self.setup.size,
            "classes": self.setup.data.classes,
            "layer_groups": len(self.base),
            "trainable_from_group": self.trainable_from,
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "frozen_params": sum(p.numel() for p in net.parameters() if not p.requires_grad),
            "augment": self.setup.cfg.augment,
            "head": str(net.head),
            "epochs_trained": len(self.history),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"Learner({s['backbone']}, {s['image_size']} px, classes {s['classes']}: groups "
            f"{s['trainable_from_group']}-{s['layer_groups'] - 1} of {s['layer_groups']} trainable, "
            f"{s['trainable_params']:,} trainable parameters, augment={s['augment']}, {s['epochs_trained']} epochs)"
        )

    def _apply(self) -> Learner:
        self.setup.net.freeze(self.trainable_from, self.setup.cfg.train_bn)
        return self

    def _set(self, **changes) -> Learner:
        """Change options of the run, checked as ``train`` checks them (one line for a bad value)."""
        cfg = dataclasses.replace(self.setup.cfg, **changes)
        cfg.check()
        # the data module reads both from the setup
        self.setup.cfg, self.setup.views = cfg, cfg.train_views(len(self.setup.data.train))
        return self

    def _before_training(self, step: str) -> None:
        if self.phases:
            raise UserError(f"{step} comes before the first fit(): the cached features and the head depend on it")
