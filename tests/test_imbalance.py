"""Class imbalance: by default the training loss weighs each class by 1/its size; --no-balance turns it off."""

import pytest
import torch
from conftest import DATASETS, make_subset

from transferlab import TrainConfig
from transferlab.data.index import index_folder
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec
from transferlab.recipe.module import TransferModule


def imbalanced(dest, source=DATASETS / "hymenoptera", big=20, small=4, val=8):
    """A real split-folder slice whose last class keeps only ``small`` of its ``big`` training images."""
    make_subset(dest, source, train=big, val=val)
    last = sorted((dest / "train").iterdir())[-1]
    for link in sorted(last.iterdir())[small:]:
        link.unlink()
    return dest


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return imbalanced(tmp_path_factory.mktemp("skewed"))


def test_the_default_weighs_classes_by_inverse_frequency_with_mean_one(skewed):
    index = index_folder(skewed)
    assert [sum(s.label == c for s in index.train) for c in (0, 1)] == [20, 4]
    weights = TransferModule.balance_weights(index, TrainConfig().balance)
    assert weights == pytest.approx([1 / 3, 5 / 3], abs=1e-6)  # 1/20 : 1/4, scaled to mean 1
    assert TransferModule.balance_weights(index, balance=False) is None


def test_a_balanced_split_keeps_weights_of_one(tmp_path):
    index = index_folder(make_subset(tmp_path, train=6, val=4))
    assert TransferModule.balance_weights(index) is None
    spec = get_spec("efficientnet_lite0")
    net = TransferNet(spec, create_backbone(spec, pretrained=False)[0], 2)
    assert TransferModule(net, len(net.groups), 1e-3, "adam", 2).class_weights.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("classes", [2, 3])
def test_weights_change_the_training_loss_but_not_the_validation_loss(classes):
    spec = get_spec("efficientnet_lite0")
    torch.manual_seed(0)
    net = TransferNet(spec, create_backbone(spec, pretrained=False)[0], classes).eval()
    weights = [0.5, 1.5] if classes == 2 else [0.4, 0.6, 2.0]
    module = TransferModule(net, len(net.groups), 1e-3, "adam", classes, weights)
    x, y = torch.randn(12, spec.feature_dim), torch.tensor([0] * 6 + [1] * 4 + [classes - 1] * 2)
    logits = module(x)
    per_image = (
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")
        if classes == 2
        else torch.nn.functional.cross_entropy(logits, y, reduction="none")
    )
    w = torch.tensor(weights)[y]
    assert torch.allclose(module.loss(logits, y, training=True), (per_image * w).sum() / w.sum())
    assert torch.allclose(module.loss(logits, y), per_image.mean())
    if classes == 3:  # the same weighted mean as PyTorch's own class weights
        expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor(weights))
        assert torch.allclose(module.loss(logits, y, training=True), expected)
    module.log = lambda *a, **k: None
    assert torch.allclose(module.training_step((x, y), 0), (per_image * w).sum() / w.sum())
    module.validation_step((x, y), 0)
    assert float(module.val_loss.compute()) == pytest.approx(float(per_image.mean()), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("balance", [True, False])
def test_a_real_run_trains_with_the_weights_unless_told_not_to(skewed, tmp_path, monkeypatch, balance):
    from transferlab import train
    from transferlab.rundir.folder import RunDir

    seen = []
    configure = TransferModule.configure_optimizers

    def spy(self):
        seen.append(self.class_weights.tolist())
        return configure(self)

    monkeypatch.setattr(TransferModule, "configure_optimizers", spy)
    cfg = TrainConfig(
        data_dir=str(skewed), out=str(tmp_path / "run"), image_size=64, epochs=1, fine_tune_epochs=1, workers=0,
        balance=balance,
    )  # fmt: skip
    train(cfg)
    expected = [1 / 3, 5 / 3] if balance else [1.0, 1.0]
    assert len(seen) == 2 and all(w == pytest.approx(expected, abs=1e-6) for w in seen)  # both phases
    assert RunDir(tmp_path / "run").read_config()["balance"] is balance
