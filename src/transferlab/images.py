"""Reading one image file safely: any mode to 8-bit RGB, EXIF orientation, a pixel limit.

PIL and numpy only, so that ONNX prediction needs no PyTorch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold, enforced as an error
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(Exception):
    """A file that is not a readable image (the message says why)."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully to 8-bit RGB with EXIF orientation applied, or raise BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS} pixel limit")
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


def pixels(path: str | Path, size: int, interpolation: str) -> np.ndarray:
    """One image as the exported model's input row: RGB, square-resized with PIL, in [0, 1].

    Matches the run's own evaluation transform exactly (torchvision resizes PIL images with PIL).
    """
    resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
    im = load_rgb(path).resize((size, size), resample)
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
