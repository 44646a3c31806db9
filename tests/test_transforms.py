"""The resize rule shared by training, evaluation, prediction and export."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from transferlab.data.images import Preprocess, decode_side, load_rgb, to_square
from transferlab.data.transforms import eval_transform, load_for
from transferlab.model.zoo import get_spec

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = next(iter(sorted((SHARED / "datasets" / "hymenoptera" / "train" / "ants").iterdir())))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (160, 170)])
def test_crop_is_torchvisions_imagenet_evaluation_resize(size):
    """Shorter side to size/crop_pct, aspect kept, centre crop: pixel for pixel what timm evaluates with."""
    im = load_rgb(PHOTO).resize(size)
    reference = v2.Compose(
        [v2.Resize(int(160 / 0.875), interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(160)]
    )
    ours = to_square(im, 160, "bicubic", "crop", 0.875)
    assert ours.size == (160, 160)
    assert np.array_equal(np.asarray(ours), np.asarray(reference(im)))


@pytest.mark.parametrize("size", [(32, 32), (33, 90)])
def test_small_images_are_upsampled_without_losing_a_margin(size):
    """Below the target size only the longer side is cropped: a square CIFAR image is resized whole."""
    im = load_rgb(PHOTO).resize(size)
    bicubic = v2.InterpolationMode.BICUBIC
    reference = v2.Compose([v2.Resize(160, interpolation=bicubic), v2.CenterCrop(160)])
    assert np.array_equal(np.asarray(to_square(im, 160, "bicubic", "crop", 0.875)), np.asarray(reference(im)))
    if size[0] == size[1]:
        assert np.array_equal(
            np.asarray(to_square(im, 160, "bicubic", "crop")), np.asarray(to_square(im, 160, "bicubic", "squash"))
        )


def test_crop_keeps_the_shape_and_squash_distorts_it():
    """A white square on a wide black canvas stays square after crop; squash makes it a tall rectangle."""
    canvas = Image.new("RGB", (400, 200))
    canvas.paste((255, 255, 255), (150, 50, 250, 150))  # a 100 x 100 square in the middle
    for resize, (w, h) in (("crop", (36, 36)), ("squash", (16, 32))):
        bright = np.asarray(to_square(canvas, 64, "bilinear", resize, 0.875))[..., 0] > 127
        cols, rows = bright.any(0).sum(), bright.any(1).sum()
        assert abs(cols - w) <= 1 and abs(rows - h) <= 1, (resize, cols, rows)


def test_export_pixels_match_the_runs_evaluation_transform():
    """The ONNX path (PIL + numpy only) feeds the same pixels as the PyTorch path."""
    spec = get_spec("efficientnet_lite0")
    for resize in ("crop", "squash"):
        transform = eval_transform(spec, 96, resize)
        x = transform(load_for(transform, PHOTO))  # as the run's loaders decode
        prep = Preprocess(96, "bicubic", resize, spec.crop_pct, spec.mean, spec.std)
        ours = (torch.from_numpy(prep.pixels(PHOTO)) - 0.5) / 0.5
        assert torch.allclose(x, ours, atol=1e-6)
        assert torch.allclose(x, torch.from_numpy(prep.normalized(PHOTO)), atol=1e-6)  # the run predictor's input


@pytest.mark.parametrize(("size", "resize"), [(96, "crop"), (160, "crop"), (100, "squash")])
def test_a_large_jpeg_is_decoded_only_as_large_as_the_resize_needs(size, resize):
    """libjpeg reduced-scale decoding: never below the side ``to_square`` resizes to, and the same picture after."""
    full = load_rgb(PHOTO)
    side = decode_side(size, resize, 0.875)
    small = load_rgb(PHOTO, at_least=side)
    assert min(full.size) >= 2 * side  # the photo is large enough for a reduced scale to apply
    assert side <= min(small.size) < min(full.size)
    assert abs(small.width / small.height - full.width / full.height) < 0.02
    a, b = (np.asarray(to_square(im, size, "bicubic", resize), dtype=np.float32) for im in (full, small))
    assert a.shape == b.shape == (size, size, 3)
    assert np.abs(a - b).mean() < 4.0  # of 255: a resampling difference, not another picture
    assert np.abs(a - b).mean() < np.abs(a - a[::-1]).mean() / 5


def test_only_jpegs_large_enough_are_decoded_smaller(tmp_path):
    """A PNG, or a JPEG under twice the side asked for, comes back whole."""
    photo = load_rgb(PHOTO)
    png = tmp_path / "photo.png"
    photo.save(png)
    assert load_rgb(png, at_least=50).size == photo.size
    assert load_rgb(PHOTO, at_least=min(photo.size) // 2 + 1).size == photo.size
