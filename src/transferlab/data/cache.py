"""Compute what the frozen part of the network outputs once, store it on disk, reuse it every epoch.

A store holds one ``.npy`` file per image (half precision, memory-mapped when read) with one
row per augmented view. Its folder name is a hash of everything that changes the content
(backbone, weights digest, image size, resize rule, preprocessing, augmentation, view count, freeze
boundary); the file name is the hash of the image's bytes. So a changed image or setting
only misses its own entries, and runs and benchmarks that agree share the work.

Several processes (DDP ranks, on one machine or several sharing the folder) fill one store
together: all agree on what is missing, each computes its share, all wait for all, then all
read. An entry that cannot be read back (cut short, overwritten, another layout) counts as
missing and is computed again.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from transferlab.data.images import load_rgb
from transferlab.data.index import Sample
from transferlab.data.transforms import AUGMENTATIONS, ToSquare
from transferlab.files import atomic_path, atomic_write
from transferlab.model.network import TransferNet, fold_batchnorm, outputs_agree, pool
from transferlab.progress import counted

CACHE_VERSION = 3  # 3: view 0 of an augmented store of two views or more is clean


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes a cached tensor, except the image bytes and the view index."""

    backbone: str
    weights: str  # digest of the weights file ("random:<seed>" without pretrained weights)
    image_size: int
    interpolation: str
    resize: str  # images.to_square's rule, with the backbone's crop_pct: "crop0.875" or "squash"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    views: int
    output: str  # "pooled", or "prefix<k>": the input of layer group k
    precision: str = "32"  # "bf16": bfloat16 where it is faster and agrees with float32 on the first batch
    version: int = CACHE_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


class Store:
    """One cache folder: ``<root>/<key digest>/<image digest>.npy``, each ``[views, *shape]`` float16."""

    def __init__(self, root: Path, key: CacheKey) -> None:
        self.key = key
        self.dir = Path(root) / key.digest()

    def path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def readable(self, digest: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        """The entry's shape if it reads back whole (float16, one row per view, ``shape`` if given), else None."""
        try:
            arr = self.load(digest)
        except Exception:  # noqa: BLE001 - missing, cut short, overwritten: all mean "compute again"
            return None
        whole = arr.dtype == np.float16 and arr.shape[0] == self.key.views and (shape is None or arr.shape == shape)
        return arr.shape if whole else None

    def load(self, digest: str) -> np.ndarray:
        """The entry memory-mapped: one visit reads only what it uses (the mapping holds a file handle while alive)."""
        return np.load(self.path(digest), mmap_mode="r")

    def read(self, digest: str) -> np.ndarray:
        """The entry read into memory, its file closed: for holding many entries at once."""
        return np.load(self.path(digest))

    def save(self, digest: str, array: np.ndarray) -> None:
        """Atomic: a killed extraction leaves no half-written entry (only whole entries are renamed in)."""
        if not (self.dir / "key.json").exists():
            atomic_write(self.dir / "key.json", json.dumps(asdict(self.key), indent=1), durable=False)
        with atomic_path(self.path(digest), durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, array.astype(np.float16))


def view_seed(digest: str, view: int) -> int:
    """Each cached view's augmentation is fixed by the image's bytes and the view index."""
    return int(hashlib.sha1(f"{digest}:{view}".encode()).hexdigest()[:8], 16)


def clean_view(key: CacheKey) -> bool:
    """Whether view 0 of a store is the image as validation sees it (resized, not augmented): every store of two
    views or more, so that the head can also be fitted as the probe is, on one clean view (``recipe/head_init``)."""
    return key.views > 1 and key.augment != "none"


class _Views(Dataset):
    """Decodes and resizes each image once, and returns its ``views`` transformed copies (view 0 as validation
    sees it when ``clean_first``)."""

    def __init__(
        self, samples: list[Sample], digests: list[str], transform: v2.Compose, views: int, clean_first: bool = False
    ) -> None:  # fmt: skip
        self.samples, self.digests, self.views = samples, digests, views
        ops = transform.transforms
        # the leading resize is deterministic and draws no random numbers: do it once, not once a view
        self.prepare, self.transform = (
            (ops[0], v2.Compose(ops[1:])) if isinstance(ops[0], ToSquare) else (None, transform)
        )
        # the clean view: the transform without its augmentations (the tensor conversion and normalization after them)
        self.clean = v2.Compose([op for op in self.transform.transforms if not isinstance(op, AUGMENTATIONS)])
        self.clean_first = clean_first

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        path = self.samples[i].path
        image = load_rgb(path) if self.prepare is None else self.prepare(self.prepare.load(path))
        out = []
        with torch.random.fork_rng(devices=[]):
            for v in range(self.views):
                torch.manual_seed(view_seed(self.digests[i], v))
                out.append((self.clean if v == 0 and self.clean_first else self.transform)(image))
        return i, torch.stack(out)


def pending(stores: dict[str, Store], digests: list[str]) -> tuple[list[int], int]:
    """Indices of images some store lacks or cannot read back, and how many of them had a damaged entry."""
    shapes: dict[str, tuple[int, ...]] = {}
    todo, damaged = [], 0
    for i, d in enumerate(digests):
        ok = True
        for name, store in stores.items():
            if not store.path(d).is_file():
                ok = False
            elif shape := store.readable(d, shapes.get(name)):
                shapes[name] = shape  # later entries must match the first whole one
            else:
                ok, damaged = False, damaged + 1
        if not ok:
            todo.append(i)
    return todo, damaged


@dataclass
class Filled:
    """What filling the stores for a list of images found and did (this process's share)."""

    digests: list[str]
    computed: int
    damaged: int
    precision: str = "32"  # what this process computed in: "bf16" when it was faster and agreed with float32


@dataclass(frozen=True)
class Pass:
    """How the frozen groups run over images: each image's views made by ``transform``, ``batch_size`` views a
    batch, decoded in ``workers`` loader processes, on ``device`` (the GPU when there is one), and how the network
    runs fastest (``decisions``: made in the first batch when None)."""

    transform: Callable
    batch_size: int = 64
    workers: int = 2
    device: torch.device | None = None
    decisions: Decisions | None = None


@dataclass(frozen=True)
class Share:
    """This process's place among the ``world`` that fill one store together (DDP ranks), and how they wait for
    each other."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


ALONE = Share()


def fill(
    net: TransferNet, samples: list[Sample], digests: list[str], stores: dict[str, Store], how: Pass,
    share: Share = ALONE,
) -> Filled:  # fmt: skip
    """Make every store hold every image, ``world`` processes sharing the work; returns this one's part.

    ``stores`` maps "pooled" and/or "prefix<k>" to a Store; one pass through the backbone fills all.
    Images that every store already holds are not decoded at all.
    """
    todo, damaged = pending(stores, digests)
    share.barrier()  # all agree on the missing entries before any process writes one
    mine, used = todo[share.rank :: share.world], "32"
    if mine:
        with torch.random.fork_rng(devices=[]):  # training draws the same numbers whether the cache was hit or filled
            used = extract(net, [samples[i] for i in mine], [digests[i] for i in mine], stores, how)
    share.barrier()  # all entries written before any process reads
    if damaged and share.rank == 0:
        where = next(iter(stores.values())).dir.parent
        warnings.warn(
            f"{damaged} feature-cache entries in {where} could not be read back (cut short, overwritten or of another "
            "version) and were computed again",
            stacklevel=2,
        )
    return Filled(digests, len(mine), damaged, used)


def extract(net: TransferNet, samples: list[Sample], digests: list[str], stores: dict[str, Store], how: Pass) -> str:
    """Run the frozen groups once over ``samples`` (all their views), save what each store keeps; the precision used."""
    views, precision = next(iter(stores.values())).key.views, next(iter(stores.values())).key.precision
    prefix_at = [int(name.removeprefix("prefix")) for name in stores if name.startswith("prefix")]
    dataset = _Views(samples, digests, how.transform, views, clean_view(next(iter(stores.values())).key))
    per_batch = max(1, how.batch_size // views)
    home = next(net.parameters()).device
    device = how.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=how.workers, pin_memory=device.type == "cuda")
    was_training = net.training
    net.eval().to(device)
    run, used = None, "32"
    with torch.inference_mode():
        what = f"frozen backbone, once: {len(samples)} images x {views} views"
        for idx, x in counted(loader, len(samples), what, size=lambda batch: len(batch[0])):
            b = x.shape[0]
            x = x.flatten(0, 1).to(device, non_blocking=True)  # [B * views, 3, H, W]
            if run is None:
                run, used = _fastest_run(net, x, precision, how.decisions)
            outputs = {}
            if prefix_at:
                k = prefix_at[0]
                z = run(x, 0, k)
                outputs[f"prefix{k}"] = z
                feats = pool(run(z, k))
            else:
                feats = pool(run(x, 0))
            outputs["pooled"] = feats
            for name, store in stores.items():
                arr = outputs[name].float().cpu().numpy().reshape(b, views, *outputs[name].shape[1:])
                for j, i in enumerate(idx.tolist()):
                    store.save(digests[i], arr[j])
    net.train(was_training).to(home)
    return used


@dataclass(frozen=True)
class Decision:
    """How the frozen groups run fastest on inputs of one shape and device: through the BatchNorm-folded copy if
    it agrees with the network (``folded``), in the precision that was faster and agreed, and the seconds per
    image each precision took (which the time budget plans from)."""

    folded: bool
    precision: str
    seconds: dict[str, float]


class Decisions:
    """One network's decisions, made once per input shape, device and precision asked, and reused by every fill
    (the validation images' float32 pass reuses the training images' fold check) and by the budget's plan."""

    def __init__(self) -> None:
        self.made: dict[tuple, Decision] = {}

    def for_input(self, net: TransferNet, folded: Callable, x: torch.Tensor, precision: str) -> Decision:
        key = (tuple(x.shape[1:]), x.device.type, precision)
        if key not in self.made:
            bf16 = self.made.get((*key[:2], "bf16"))  # a bf16 decision timed float32 and checked the fold too
            if precision == "32" and bf16:
                self.made[key] = Decision(bf16.folded, "32", bf16.seconds)
            else:
                self.made[key] = _choose(net, folded, x[:8], precision)
        return self.made[key]


def _fastest_run(
    net: TransferNet, x: torch.Tensor, precision: str = "32", decisions: Decisions | None = None
) -> tuple[Callable, str]:
    """The fastest way to run the frozen groups that agrees with ``net.forward_groups`` on the first images; its name.

    BatchNorm-folded groups (fewer passes over memory) when they match to float tolerance; then,
    when ``precision`` is "bf16", bfloat16 autocast on top if it is faster on this machine and
    its pooled features point the same way as float32's (cosine >= ``BF16_MIN_COSINE`` for every image).
    ``decisions`` keeps what was decided, for the next fill of the same network (``Decisions``).
    """
    groups = fold_batchnorm(net.groups)

    def folded(z: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        if z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        for group in groups[start:stop]:
            z = group(z)
        return z

    decision = (decisions or Decisions()).for_input(net, folded, x, precision)
    base = folded if decision.folded else net.forward_groups
    return (base, "32") if decision.precision == "32" else (_in_bf16(base), "bf16")


def frozen_speed(
    net: TransferNet, x: torch.Tensor, precision: str = "32", device: torch.device | None = None,
    decisions: Decisions | None = None,
) -> dict[str, float]:  # fmt: skip
    """Images per second through all the frozen groups on images like ``x``: as ``extract`` will run them
    ("chosen") and in float32 ("32"), measured while choosing how (the choice kept in ``decisions`` for the fills).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decisions = Decisions() if decisions is None else decisions
    home, was_training = next(net.parameters()).device, net.training
    net.eval().to(device)
    with torch.inference_mode():
        _fastest_run(net, x.to(device), precision, decisions)
    net.train(was_training).to(home)
    made = decisions.made[(tuple(x.shape[1:]), device.type, precision)]
    return {"chosen": 1 / made.seconds[made.precision], "32": 1 / made.seconds["32"]}


def _in_bf16(run: Callable) -> Callable:
    """``run`` (frozen groups: input, start, stop) under bfloat16 autocast, its output back in float32."""

    def bf16(z: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            return run(z, start, stop).float()

    return bf16


def _choose(net: TransferNet, folded: Callable, x: torch.Tensor, precision: str) -> Decision:
    """Whether the folded groups agree with ``net.forward_groups`` on ``x``, the precision to use, seconds per image.

    Each precision is timed on ``x`` (bf16 against float32 alternated, best of two: fair under load).
    """
    reference = net.forward_groups(x, 0)
    fold_agrees = outputs_agree(folded(x, 0), reference)
    base = folded if fold_agrees else net.forward_groups
    runs = {"32": base} | ({"bf16": _in_bf16(base)} if precision == "bf16" else {})
    seconds = dict.fromkeys(runs, float("inf"))
    for name, run in list(runs.items()) * len(runs):
        start = time.perf_counter()
        out = run(x, 0)
        seconds[name] = min(seconds[name], (time.perf_counter() - start) / len(x))
    if "bf16" not in runs:
        return Decision(fold_agrees, "32", seconds)
    agree = float(torch.nn.functional.cosine_similarity(pool(out), pool(reference)).min())
    faster = agree >= BF16_MIN_COSINE and seconds["bf16"] < seconds["32"]
    return Decision(fold_agrees, "bf16" if faster else "32", seconds)


BF16_MIN_COSINE = 0.995


def bf16_available(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (a CUDA GPU that supports it, or AVX-512 BF16 / AMX on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
