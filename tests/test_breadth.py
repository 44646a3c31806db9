"""The recipe on the breadth of timm's zoo: every architecture trains its head, fine-tunes from the default depth,
predicts and exports to ONNX with parity. Random weights (nothing is downloaded) and each model's smallest input,
so it is unit-sized; what it checks is that the layer groups, the freeze and BatchNorm policy, the BatchNorm
folding and the export hold for BatchNorm, LayerNorm, GroupNorm and normalization-free models alike."""

from __future__ import annotations

import copy
import csv
import warnings

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from conftest import make_subset

from transferlab import TrainConfig, create_backbone, export_run, get_spec, train
from transferlab.inference.export import onnx_pooling
from transferlab.inference.predictor import from_run, predict
from transferlab.model.network import Judged, TransferNet, fold_batchnorm, outputs_agree, resolve_fine_tune_at

# timm family: its smallest variants (the zoo's own families by their zoo names)
ARCHITECTURES = {
    "ResNet": "resnet10t",
    "ResNeXt": "resnext26ts",
    "RepVGG": "repvgg_a0",
    "Inception": "inception_v3",
    "MobileNetV2": "mobilenetv2_050",
    "MobileNetV3": "mobilenetv3_small_050",
    "LCNet": "lcnet_050",
    "MnasNet": "mnasnet_small",
    "EfficientNet": "efficientnet_b0",
    "EfficientNet-Lite": "efficientnet_lite0",
    "EfficientNetV2": "tf_efficientnetv2_b0",
    "EfficientNet (GroupNorm)": "efficientnet_b0_gn",
    "RegNetX": "regnetx_002",
    "RegNetY": "regnety_002",
    "ConvNeXt": "convnext_atto",
    "EdgeNeXt": "edgenext_xx_small",
    "DeiT": "deit_tiny_patch16_224",
    "LeViT": "levit_128s",
    "MobileViT": "mobilevit_xxs",
    "ReXNet": "rexnet_100",
    "DenseNet": "densenet121",
    "Swin": "swin_tiny_patch4_window7_224",
    "NF-RegNet": "nf_regnet_b0",
    "GhostNet": "ghostnet_050",  # its head's dropout reads the top module's training flag
    "VGG": "vgg11",  # its head pools a map under 7 x 7 up to 7 x 7, which ONNX needs written out
    "HRNet": "hrnet_w18_small",  # branches: only a stem, a first layer and the rest run one after another
    "PoolFormer": "poolformer_s12",  # no group_matcher: groups from its feature_info
}
FEWER_GROUPS = {"hrnet_w18_small": 3}  # its branches meet only after the last stage: nothing to cut between
EXPLODES_AT_RANDOM = {"inception_v3"}  # logits of 1e7 with random weights and initial BatchNorm statistics


@pytest.mark.parametrize("name", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_groups_train_fold_and_export(name, tmp_path):
    """Through the library's own pieces, in process: a head step frozen, a fine-tuning step from the default depth
    (only the groups above it change, frozen BatchNorm statistics stay), the folded copy, ONNX with parity."""
    spec = get_spec(name)
    torch.manual_seed(0)
    backbone, _ = create_backbone(spec, pretrained=False)
    net = TransferNet(spec, backbone, num_classes=3)
    groups = len(net.groups)
    at = resolve_fine_tune_at(None, groups)
    assert groups >= FEWER_GROUPS.get(name, 4) and 0 < at < groups, (
        f"{name}: {groups} layer groups, fine-tuning from {at}"
    )
    x, y = torch.rand(4, 3, spec.min_size, spec.min_size), torch.tensor([0, 1, 2, 0])
    if name in EXPLODES_AT_RANDOM:
        _calibrate(backbone, x)
    with torch.no_grad():
        assert torch.allclose(net.eval().features(x), backbone.forward_head(backbone.forward_features(x), True))
    before = copy.deepcopy(net.state_dict())
    for upto in (groups, at):  # phase 1, then phase 2
        net.freeze(upto)
        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=1e-3)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    after = net.state_dict()
    changed = {k.split(".")[1] for k in after if k.startswith("groups.") and not torch.equal(before[k], after[k])}
    assert changed and min(map(int, changed)) >= at, f"{name}: groups {sorted(changed)} changed below {at}"
    net.eval()
    with torch.no_grad():
        assert outputs_agree(fold_batchnorm(net)(x), net(x))
        reference, top = (t.numpy() for t in Judged(net, normalize=True)(x))
    path = tmp_path / "m.onnx"
    with onnx_pooling():
        torch.onnx.export(Judged(net, normalize=True), (x,), str(path), opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, scores = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(probs - reference).max() < 1e-4 and np.abs(scores - top).max() < 1e-4


def _calibrate(backbone: torch.nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics of the batch for random weights: their initial ones blow some nets up (Inception's
    logits reach 1e7), which would test the random initialization rather than the recipe."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass sets them to the batch's
    with torch.no_grad():
        backbone.train()(x)
    backbone.eval()


def test_convnext_trains_and_fine_tunes_from_the_default_depth(tmp_path):
    """The issue's case, end to end: a model outside the zoo, random weights, the default --fine-tune-at."""
    data = make_subset(tmp_path / "data", train=4, val=3)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data_dir=str(data), out=str(out), backbone="convnext_atto", pretrained=False, image_size=64,
        batch_size=8, epochs=1, fine_tune_epochs=1, workers=0, cache_views=1, extract_precision="32",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small images for the backbone: warned about elsewhere
        metrics = train(cfg)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["num_layer_groups"], config["fine_tune_at"]) == (5, 3)
    with open(out / "history.csv") as f:
        assert [r["phase"] for r in csv.DictReader(f)] == ["head", "feature_extraction", "fine_tune"]
    assert metrics["num_val_images"] == 6
    results = predict(from_run(out), sorted((data / "val" / "ants").iterdir())[:2], k=2)
    assert len(results) == 2 and all(abs(sum(t["prob"] for t in r["top"]) - 1) < 1e-4 for r in results)
    assert export_run(out, "onnx", tmp_path / "m.onnx", check_images=6)["max_prob_difference"] < 1e-4


@pytest.mark.parametrize(("size", "out"), [((1, 1), (7, 7)), ((3, 5), (7, 7)), ((6, 4), (4, 3)), ((14, 14), (7, 7))])
def test_onnx_pooling_is_pytorchs_adaptive_pooling(size, out):
    """The pooling ONNX cannot express, as two matrices: the same averages as PyTorch's, bin for bin."""
    x, original = torch.rand(2, 3, *size), torch.nn.functional.adaptive_avg_pool2d
    expected = original(x, out)
    with onnx_pooling():
        assert torch.nn.functional.adaptive_avg_pool2d is not original
        got = torch.nn.functional.adaptive_avg_pool2d(x, out)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    assert torch.nn.functional.adaptive_avg_pool2d is original  # restored after the export
