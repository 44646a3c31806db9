"""Reading one image file safely: any mode to 8-bit RGB, EXIF orientation, a pixel limit.

PIL and numpy only, so that ONNX prediction needs no PyTorch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from transferlab.config import RESIZES

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold, enforced as an error
MAX_ASPECT = 3  # a longer side than this many shorter ones is cut before resizing: the crop keeps the centre only
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(Exception):
    """A file that is not a readable image (the message says why)."""


def load_rgb(path: str | Path, at_least: int | None = None) -> Image.Image:
    """Decode ``path`` to 8-bit RGB with EXIF orientation applied, or raise BadImage.

    ``at_least``: the shorter side the caller will resize to. A JPEG that large several times over is
    decoded at a reduced scale (libjpeg's DCT scaling by 1/2, 1/4 or 1/8), never below that side, which is
    faster (benchmarks/decode.py); the same rule holds everywhere (training, evaluation, export).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS} pixel limit")
                if at_least and im.format == "JPEG" and 2 * at_least <= min(im.size):
                    r = at_least / min(im.size)
                    im.draft(None, (math.ceil(im.width * r), math.ceil(im.height * r)))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImage(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


def decode_side(size: int, resize: str = "crop", crop_pct: float = 0.875) -> int:
    """The shorter side ``to_square`` resizes a large picture to: what decoding keeps (``load_rgb``'s ``at_least``)."""
    return int(size / crop_pct) if resize == "crop" else size


def to_square(
    im: Image.Image, size: int, interpolation: str, resize: str = "crop", crop_pct: float = 0.875
) -> Image.Image:
    """Bring a picture to ``size`` x ``size``, the one rule shared by training, evaluation and export.

    ``crop`` is how ImageNet backbones are evaluated (timm, Keras applications): the shorter side
    to ``size / crop_pct``, keeping the aspect ratio, then the centre ``size`` square; it beats ``squash``,
    the classic tutorial's resize of the whole picture to a square, which distorts its shape
    (docs/benchmarks.md, crop against squash). An image smaller than ``size`` is upsampled to fill the
    square without the extra margin: it has no pixels to spare (CIFAR's 32 px objects fill the frame).
    """
    resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
    if resize == "squash":
        return im.resize((size, size), resample)
    if resize != "crop":
        raise ValueError(f"resize must be one of {RESIZES}")
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        # only the centre square is kept: cut the long side first, so a 65000 x 1 strip costs what a square does
        keep = MAX_ASPECT * min(w, h)
        im = im.crop(
            ((w - keep) // 2, 0, (w - keep) // 2 + keep, h)
            if w > h
            else (0, (h - keep) // 2, w, (h - keep) // 2 + keep)
        )
        w, h = im.size
    short = decode_side(size, resize, crop_pct) if min(w, h) >= size else size
    w, h = (short, max(short, int(short * h / w))) if w <= h else (max(short, int(short * w / h)), short)
    im = im.resize((w, h), resample)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is made from a picture: everything ``to_square`` and normalization need.

    Read from a run's config.yaml or an export's metadata, never from defaults, so a model is
    always fed the way it was trained.
    """

    image_size: int
    interpolation: str
    resize: str
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_meta(cls, meta: dict) -> Preprocess:
        """From an export's metadata or a run's config (runs and exports made before the crop rule squashed)."""
        spec = meta.get("spec", meta)
        return cls(
            int(meta["image_size"]), spec["interpolation"], meta.get("resize", "squash"),
            float(spec.get("crop_pct", 0.875)), tuple(spec["mean"]), tuple(spec["std"]),
        )  # fmt: skip

    def to_square(self, im: Image.Image) -> Image.Image:
        return to_square(im, self.image_size, self.interpolation, self.resize, self.crop_pct)

    def load(self, path: str | Path) -> Image.Image:
        """The picture at ``path``, decoded as large as ``to_square`` needs."""
        return load_rgb(path, decode_side(self.image_size, self.resize, self.crop_pct))

    def rgb(self, path: str | Path) -> np.ndarray:
        """One image as an export's input row: 8-bit RGB resized by ``to_square``, S x S x 3."""
        return np.asarray(self.to_square(self.load(path)), dtype=np.uint8)

    def pixels(self, path: str | Path) -> np.ndarray:
        """One image as RGB resized by ``to_square``, float32 in [0, 1], 3 x S x S (exports before 8-bit input)."""
        return self.rgb(path).astype(np.float32).transpose(2, 0, 1) / 255.0

    def normalized(self, path: str | Path) -> np.ndarray:
        """One image as a trained network's input row: ``pixels`` normalized by the backbone's mean and std."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (self.pixels(path) - mean) / std
