import pytest
import timm
import torch

from transferlab.errors import UserError
from transferlab.model.groups import layer_groups
from transferlab.model.network import pool, resolve_fine_tune_at
from transferlab.model.zoo import TIMM, ZOO, default_size, expand_names, get_spec


@pytest.mark.parametrize("name", list(ZOO))
def test_spec_agrees_with_timm_pretrained_config(name):
    spec = ZOO[name]
    with torch.device("meta"):
        model = timm.create_model(spec.hub_id.removeprefix("timm/") if spec.hub_id else spec.arch, num_classes=0)
    cfg = model.pretrained_cfg
    assert cfg["input_size"][-1] == spec.input_size
    assert cfg["interpolation"] == spec.interpolation
    assert tuple(cfg["mean"]) == pytest.approx(spec.mean)
    assert tuple(cfg["std"]) == pytest.approx(spec.std)
    assert cfg["crop_pct"] == pytest.approx(spec.crop_pct)
    assert model.num_features == spec.feature_dim or spec.family == "vgg"


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_lite0"])
def test_layer_groups_in_order_equal_forward_features(name):
    """Running the groups bottom to top must be exactly the backbone: else caching and unfreezing lie."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0).eval()
    groups = layer_groups(model, spec.family)
    assert len(groups) >= 5
    x = torch.randn(2, 3, max(spec.min_size, 96), max(spec.min_size, 96))
    with torch.no_grad():
        y = x
        for g in groups:
            y = g(y)
        ref = model.forward_features(x)
    assert torch.equal(y, ref)
    assert pool(y).shape == (2, spec.feature_dim)
    # every parameter of the backbone belongs to exactly one group (VGG's fc-as-conv pre_logits excepted)
    grouped = {id(p) for g in groups for p in g.parameters()}
    backbone = {id(p) for n, p in model.named_parameters() if not n.startswith("pre_logits")}
    assert grouped == backbone


def test_any_timm_model_passes_through_with_its_config():
    spec = get_spec("resnet18")
    assert spec.arch == "resnet18" and spec.family == TIMM and spec.feature_dim == 512
    assert spec.hub_id and spec.hub_id.startswith("timm/resnet18")
    assert get_spec("mobilenetv3_small_050").feature_dim == 1024  # its head convolution's width: what pooling gives
    assert get_spec("deit_tiny_patch16_224").min_size == 224  # a fixed grid of positions: its own size only


def test_timm_gives_the_zoo_table_s_groups_for_resnet():
    """(For EfficientNet timm puts the head convolution in the last block's group; the table keeps it apart.)"""
    spec = get_spec("resnet50")
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0)
    ours = layer_groups(model, spec.family)
    theirs = layer_groups(model, TIMM, 64)
    assert [[id(m) for m in g][:1] for g in ours] == [[id(m) for m in g][:1] for g in theirs]


def test_a_fraction_maps_onto_any_number_of_groups_and_a_given_index_outside_is_one_line():
    assert [resolve_fine_tune_at(None, n) for n in (1, 2, 5, 13, 16)] == [0, 1, 3, 8, 10]
    assert resolve_fine_tune_at("0.99", 5) == 4 and resolve_fine_tune_at("-1", 5) == 4
    with pytest.raises(UserError, match=r"^--fine-tune-at '7' is outside the backbone's 5 layer groups: use 0..4$"):
        resolve_fine_tune_at("7", 5)
    with pytest.raises(UserError, match="a fraction of the backbone is at least 0 and below 1"):
        resolve_fine_tune_at("1.5", 5)


def test_unknown_backbone_is_one_clear_line():
    with pytest.raises(UserError, match="unknown backbone 'resnet5O'"):
        get_spec("resnet5O")


def test_aliases_expand():
    assert expand_names("lite") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert len(expand_names("keras7,efficientnet_lite0")) == 8


def test_the_default_size_goes_above_native_only_for_photos_that_large():
    lite0, lite2 = get_spec("efficientnet_lite0"), get_spec("efficientnet_lite2")
    assert default_size(lite0, 372) == 288  # hymenoptera's median shorter side: 1.25 x 224 = 280, to 16 px
    assert default_size(lite0, 288) == 288
    assert default_size(lite0, 287) == 224  # not that large: the native size
    assert default_size(lite0, 32) == 224  # small images are upsampled to the native size, no further
    assert default_size(lite2, 400) == 320 and default_size(lite2, 300) == 260
