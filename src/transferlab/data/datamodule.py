"""The data of one run, per phase, as a LightningDataModule: images, cached features or a cached prefix.

Feature extraction trains on what the whole frozen backbone outputs ("pooled"), fine-tuning on
what the still-frozen groups below ``fine_tune_at`` output ("prefix<k>"); both come from the
feature cache, filled once (by every process together under DDP). ``--cache none`` feeds images.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from transferlab.data.cache import CacheKey, Decisions, Pass, Share, Store, bf16_available, fill, frozen_speed
from transferlab.data.index import Sample, file_digest, targets
from transferlab.data.transforms import eval_transform, load_for, train_transform

if TYPE_CHECKING:  # for the annotation only: the data stage needs no part of the recipe's code
    from transferlab.recipe.plan import Setup

PRELOAD_BYTES = 256 << 20  # sets smaller than this are read into memory once; larger ones stay memory-mapped


class ImageDataset(Dataset):
    """Decoded, transformed images with their targets (``index.targets``: the plain, uncached path)."""

    def __init__(self, samples: list[Sample], transform, labels: list) -> None:
        self.samples, self.transform, self.labels = samples, transform, labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_for(self.transform, self.samples[i].path)), self.labels[i]


class CachedDataset(Dataset):
    """Cached tensors with targets (``index.targets``); a training set draws one of the cached views at random per
    visit.

    Memory stays bounded whatever the dataset size: small sets (pooled features) are read into
    memory once, large ones (feature maps) are read from memory-mapped files per visit.
    """

    def __init__(self, store: Store, digests: list[str], labels: list, random_view: bool) -> None:
        self.store, self.digests, self.labels, self.random_view = store, digests, labels, random_view
        first = store.load(digests[0])
        self.preloaded = None
        if first.nbytes * len(digests) <= PRELOAD_BYTES:
            # read, not mapped: a mapping per entry would hold a file handle each (50,000 exceed the limit)
            self.preloaded = np.stack([store.read(d) for d in digests])

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.preloaded[i] if self.preloaded is not None else self.store.load(self.digests[i])
        v = int(torch.randint(arr.shape[0], ())) if self.random_view else 0
        return torch.from_numpy(np.array(arr[v], dtype=np.float32)), self.labels[i]


class TransferData(pl.LightningDataModule):
    """Loaders for the phase chosen with ``use``; validation counts every image once, whatever the process count."""

    def __init__(self, setup: Setup, weights_digest: str, cache_root: Path) -> None:
        super().__init__()
        self.s, self.weights_digest, self.cache_root = setup, weights_digest, Path(cache_root)
        self.output: str | None = None
        self.timings = {"extract_seconds": 0.0, "extracted_images": 0, "damaged_cache_entries": 0}
        self.extracted_per_process: list[int] = []  # what each DDP process computed (they share the work)
        self.extract_precision = "none"  # what this process computed the cache in, if it computed any
        self._digests: dict[str, list[str]] = {}
        self._decisions = Decisions()  # how the frozen groups run fastest, decided on the first batch extracted
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._ready: str | None | bool = False  # the output the sets were made for (False: none made)

    # what it reads of the run, always from the setup (which the Learner may change between phases)
    index = property(lambda self: self.s.data)
    spec = property(lambda self: self.s.spec)
    size = property(lambda self: self.s.size)
    cfg = property(lambda self: self.s.cfg)
    net = property(lambda self: self.s.net)
    fine_tune_at = property(lambda self: self.s.fine_tune_at)

    def use(self, phase: str) -> int:
        """Choose the phase's inputs; returns the layer group they enter the network at."""
        self._ready = False  # the phase's sets are made by the next setup
        if self.cfg.cache == "none" or (phase == "fine_tune" and self.fine_tune_at == 0):
            self.output = None  # nothing frozen below the trainable part: images go in
            return 0
        if phase == "feature_extraction":
            self.output = "pooled"
            return len(self.net.groups)
        self.output = f"prefix{self.fine_tune_at}"
        return self.fine_tune_at

    def transforms(self) -> tuple:
        cfg = self.cfg
        return train_transform(self.spec, self.size, cfg.augment, cfg.resize), eval_transform(
            self.spec, self.size, cfg.resize
        )

    def setup(self, stage: str) -> None:
        if self._ready == self.output:  # ``validate`` then ``fit`` of one phase: the sets are made once
            return
        self._ready = self.output
        train_tf, val_tf = self.transforms()
        if self.output is None:
            self.train_set = ImageDataset(self.index.train, train_tf, self._targets(self.index.train))
            self.val_set = ImageDataset(self.index.val, val_tf, self._targets(self.index.val))
            return
        self.train_set = self._cached("train", self.index.train, self.cfg.augment, self.s.views, train_tf)
        self.val_set = self._cached("val", self.index.val, "none", 1, val_tf)

    def stores(self, augment: str, views: int, precision: str = "32") -> dict[str, Store]:
        """The stores one extraction pass fills: pooled features, and the fine-tuning prefix when there is one."""
        s, cfg = self.spec, self.cfg
        outputs = ["pooled"] + (
            [f"prefix{self.fine_tune_at}"] if cfg.fine_tune_epochs > 0 and self.fine_tune_at else []
        )
        resize = f"crop{s.crop_pct}" if cfg.resize == "crop" else cfg.resize
        key = CacheKey(
            s.name,
            self.weights_digest,
            self.size,
            s.interpolation,
            resize,
            s.mean,
            s.std,
            augment,
            views,
            "",
            precision,
        )
        return {o: Store(self.cache_root, dataclasses.replace(key, output=o)) for o in outputs}

    def _cached(self, split: str, samples: list[Sample], augment: str, views: int, transform) -> CachedDataset:
        if split not in self._digests:
            self._digests[split] = [file_digest(s.path) for s in samples]  # hashed once per run, not per phase
        trainer = self.trainer
        device = trainer.strategy.root_device
        # training views in bf16 where it is native and agrees; validation as predict computes it, in float32, so
        # that the accuracies which choose the best epoch are the ones the model gives
        precision = self._precision(device) if split == "train" else "32"
        stores = self.stores(augment, views, precision)
        start = time.perf_counter()
        how = Pass(transform, self.cfg.batch_size * views, self.cfg.workers, device, self._decisions)
        share = Share(trainer.global_rank, trainer.world_size, trainer.strategy.barrier)
        done = fill(self.net, samples, self._digests[split], stores, how, share)
        self.timings["extract_seconds"] += time.perf_counter() - start
        counts = trainer.strategy.all_gather(torch.tensor(done.computed)).reshape(-1).tolist()
        self.extracted_per_process = [a + b for a, b in zip(counts, self.extracted_per_process or [0] * len(counts))]
        self.timings["extracted_images"] += sum(counts)
        self.timings["damaged_cache_entries"] += done.damaged
        if done.computed and split == "train":
            self.extract_precision = done.precision
        return CachedDataset(stores[self.output], done.digests, self._targets(samples), random_view=augment != "none")

    def _targets(self, samples: list[Sample]) -> list:
        return targets(samples, len(self.index.classes), self.index.multi_label)

    def _precision(self, device: torch.device) -> str:
        """What the cache is asked to compute in on ``device``: "bf16" where it is native (and allowed), else "32"."""
        policy = self.cfg.extract_precision
        return "bf16" if policy == "bf16" or (policy == "auto" and bf16_available(device)) else "32"

    def frozen_speed(self, images: int = 8) -> dict[str, float]:
        """Images per second on the first training images: decoded and augmented ("prepare", one process), then
        through the frozen backbone as this run's extraction will compute ("chosen") and in float32 ("32").

        Measured before any Trainer exists, on the GPU unless ``--accelerator cpu``; the fills reuse the choice.
        """
        gpu = torch.cuda.is_available() and self.cfg.accelerator != "cpu"
        device = torch.device("cuda" if gpu else "cpu")
        train_tf, val_tf = self.transforms()
        start = time.perf_counter()
        pictures = [load_for(train_tf, s.path) for s in self.index.train[:images]]
        augmented = [train_tf(p) for p in pictures]
        prepare = len(augmented) / (time.perf_counter() - start)
        x = torch.stack([val_tf(p) for p in pictures])  # chosen on clean views, as the validation images are seen
        return {**frozen_speed(self.net, x, self._precision(device), device, self._decisions), "prepare": prepare}

    def _loader(self, dataset: Dataset, batch_size: int, **kw) -> DataLoader:
        workers = self.cfg.workers if self.output is None else 0  # a memory-mapped row is cheaper than a worker trip
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, **kw)

    def train_dataloader(self) -> DataLoader:
        world, rank, seed = self.trainer.world_size, self.trainer.global_rank, self.cfg.seed
        if world > 1:  # Lightning sets the epoch on it, so every epoch has its own order
            sampler = DistributedSampler(self.train_set, world, rank, shuffle=True, seed=seed)
            return self._loader(self.train_set, self.cfg.batch_size, sampler=sampler)
        return self._loader(
            self.train_set, self.cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )

    def val_dataloader(self) -> DataLoader:
        # a shard per process without the repeats a DistributedSampler pads with: each image counts once
        shard = range(self.trainer.global_rank, len(self.val_set), self.trainer.world_size)
        return self._loader(self.val_set, max(self.cfg.batch_size, 64), sampler=list(shard))
