import dataclasses

import numpy as np
import pytest
import torch
from conftest import FAST

from transferlab.cache import CacheKey, Store, extract
from transferlab.data import index_folder
from transferlab.images import load_rgb
from transferlab.model import TransferNet, fold_batchnorm
from transferlab.train import TrainConfig, train
from transferlab.transforms import eval_transform, train_transform
from transferlab.weights import create_backbone
from transferlab.zoo import get_spec

SIZE = 96


@pytest.fixture(scope="module")
def net():
    spec = get_spec("efficientnet_lite0")
    backbone, _ = create_backbone(spec)
    return TransferNet(spec, backbone, num_classes=2).eval()


def _key(**change):
    key = CacheKey(
        "efficientnet_lite0", "abc", SIZE, "bicubic", "crop0.875", (0.5,) * 3, (0.5,) * 3, "none", 1, "pooled"
    )
    return dataclasses.replace(key, **change)


def test_cached_features_and_prefix_give_the_plain_paths_outputs(net, small_data, tmp_path):
    samples = index_folder(small_data).val[:6]
    tf = eval_transform(net.spec, SIZE)
    stores = {"pooled": Store(tmp_path, _key()), "prefix6": Store(tmp_path, _key(output="prefix6"))}
    digests, computed = extract(net, samples, tf, stores, batch_size=4, workers=0)
    assert computed == 6
    x = torch.stack([tf(load_rgb(s.path)) for s in samples])
    with torch.no_grad():
        feats, logits = net.features(x), net(x)
        pooled = torch.from_numpy(np.stack([stores["pooled"].load(d)[0] for d in digests]).astype(np.float32))
        prefix = torch.from_numpy(np.stack([stores["prefix6"].load(d)[0] for d in digests]).astype(np.float32))
        # float16 storage: agreement to half precision
        assert torch.allclose(pooled, feats, rtol=2e-3, atol=2e-3)
        assert torch.allclose(net.top(pooled, len(net.groups)), logits, atol=5e-3)
        assert torch.allclose(net.top(prefix, 6), logits, atol=5e-3)
    assert prefix.shape[1:] == net.run(x[:1], 0, 6).shape[1:]
    assert stores["pooled"].load(digests[0]).dtype == np.float16


def test_augmented_views_are_fixed_per_image_and_distinct(net, small_data, tmp_path):
    samples = index_folder(small_data).train[:2]
    tf = train_transform(net.spec, SIZE, "keras")
    a = {"pooled": Store(tmp_path / "a", _key(augment="keras", views=3))}
    b = {"pooled": Store(tmp_path / "b", _key(augment="keras", views=3))}
    da, _ = extract(net, samples, tf, a, workers=0)
    extract(net, samples, tf, b, workers=0)
    va, vb = a["pooled"].load(da[0]), b["pooled"].load(da[0])
    assert va.shape == (3, 1280) and np.array_equal(va, vb)  # reproducible
    assert not np.array_equal(va[0], va[1])  # views differ


@pytest.mark.parametrize(
    "change",
    [
        {"backbone": "efficientnet_lite1"},
        {"weights": "other"},
        {"image_size": 128},
        {"interpolation": "bilinear"},
        {"resize": "squash"},
        {"resize": "crop0.9"},
        {"mean": (0.485, 0.456, 0.406)},
        {"std": (0.229, 0.224, 0.225)},
        {"augment": "keras"},
        {"views": 2},
        {"output": "prefix5"},
    ],
)
def test_cache_key_changes_with_every_input(change):
    assert _key(**change).digest() != _key().digest()
    assert _key().digest() == _key().digest()


def test_changed_image_misses_only_its_own_entry(net, small_data, tmp_path):
    import shutil

    from transferlab.data import Sample

    samples = index_folder(small_data).val[:3]
    copies = []
    for i, s in enumerate(samples):
        dest = tmp_path / f"{i}.jpg"
        shutil.copyfile(s.path, dest)
        copies.append(Sample(dest, s.label))
    stores = {"pooled": Store(tmp_path / "c", _key())}
    tf = eval_transform(net.spec, SIZE)
    assert extract(net, copies, tf, stores, workers=0)[1] == 3
    assert extract(net, copies, tf, stores, workers=0)[1] == 0
    from PIL import Image

    Image.open(copies[1].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copies[1].path)  # new content
    assert extract(net, copies, tf, stores, workers=0)[1] == 1


def test_second_run_hits_the_shared_cache(small_data, tmp_path):
    cfg = dict(data_dir=str(small_data), cache_dir=str(tmp_path / "cache"), **FAST)
    first = train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    second = train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    assert first["timings"]["extracted_images"] == 48 + 32
    assert second["timings"]["extracted_images"] == 0
    assert second["best_val_accuracy"] == first["best_val_accuracy"]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100", "inception_v3"])
def test_batchnorm_folding_keeps_the_outputs_and_removes_the_batchnorms(arch):
    """Folded copies compute the same features (with non-trivial BatchNorm statistics) without BatchNorm passes."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    folded = fold_batchnorm(model)
    with torch.inference_mode():
        a, b = model(x), folded(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
