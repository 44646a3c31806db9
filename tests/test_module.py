"""The LightningModule on its own: a 3-class batch of random tensors, both head shapes, exact metrics."""

import pytest
import torch

from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec
from transferlab.recipe.module import TransferModule


@pytest.fixture(scope="module")
def spec_backbone():
    spec = get_spec("efficientnet_lite0")
    return spec, lambda: create_backbone(spec, pretrained=False)[0]


@pytest.mark.parametrize("classes", [2, 3])
def test_a_random_batch_gives_the_loss_and_accuracy_of_its_head(spec_backbone, classes):
    spec, backbone = spec_backbone
    torch.manual_seed(0)
    net = TransferNet(spec, backbone(), classes).eval()
    start = len(net.groups)  # cached path: pooled features in
    module = TransferModule(net, start, 1e-3, "adam", classes)
    x, y = torch.randn(12, spec.feature_dim), torch.arange(12) % classes
    logits = module(x)
    assert logits.shape == (12, 1 if classes == 2 else classes)
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        if classes == 2
        else torch.nn.functional.cross_entropy(logits, y)
    )
    assert torch.allclose(module.loss(logits, y), expected)
    module.log = lambda *a, **k: None  # outside a Trainer: the metric objects still accumulate
    module.validation_step((x[:5], y[:5]), 0)
    module.validation_step((x[5:], y[5:]), 1)
    from transferlab.model.network import logits_to_probabilities

    right = (logits_to_probabilities(logits).argmax(-1) == y).float().mean()
    assert float(module.val_accuracy.compute()) == pytest.approx(float(right))
    assert float(module.val_loss.compute()) == pytest.approx(float(expected), rel=1e-5)  # weighted by batch size
    assert float(module.val_images.compute()) == 12


def test_the_optimizer_holds_only_the_trainable_groups(spec_backbone):
    spec, backbone = spec_backbone
    net = TransferNet(spec, backbone(), 3)
    net.freeze(6)
    optimizer = TransferModule(net, 6, 1e-3, "sgd", 3).configure_optimizers()
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert held == trainable and isinstance(optimizer, torch.optim.SGD)
    assert not any(id(p) in held for p in net.groups[5].parameters())


@pytest.mark.parametrize("classes", [2, 3])
def test_label_smoothing_shapes_the_training_loss_only(spec_backbone, classes):
    """A two-class target of 1 becomes 1 - s/2; softmax cross-entropy spreads s over the classes."""
    spec, backbone = spec_backbone
    net = TransferNet(spec, backbone(), classes).eval()
    module = TransferModule(net, len(net.groups), 1e-3, "adam", classes, smoothing=0.2)
    torch.manual_seed(0)
    logits, y = torch.randn(8, 1 if classes == 2 else classes), torch.arange(8) % classes
    if classes == 2:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float() * 0.8 + 0.1)
    else:
        target = torch.nn.functional.one_hot(y, classes).float() * 0.8 + 0.2 / classes
        expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(module.loss(logits, y, training=True), expected)
    plain = TransferModule(net, len(net.groups), 1e-3, "adam", classes)
    assert torch.allclose(module.loss(logits, y), plain.loss(logits, y))  # validation: never smoothed
    assert not torch.allclose(module.loss(logits, y, training=True), module.loss(logits, y))


@pytest.mark.parametrize("classes", [2, 3])
def test_mixup_blends_the_training_batch_and_its_labels_only(spec_backbone, classes):
    """The loss is the blend of both labels' losses on the blended input; validation sees the batch as it is."""
    from transferlab.recipe.module import mix

    spec, backbone = spec_backbone
    net = TransferNet(spec, backbone(), classes).eval()
    module = TransferModule(net, len(net.groups), 1e-3, "adam", classes, mixup=0.4)
    module.log = lambda *a, **k: None
    x, y = torch.randn(16, spec.feature_dim), torch.arange(16) % classes
    torch.manual_seed(3)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(3)
    blended, partner, lam = mix(x, 0.4)
    assert 0 < lam < 1 and sorted(partner.tolist()) == list(range(16)) and not torch.equal(y[partner], y)
    assert torch.allclose(blended, lam * x + (1 - lam) * x[partner])
    logits = module(blended)
    expected = lam * module.loss(logits, y) + (1 - lam) * module.loss(logits, y[partner])
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, module.loss(module(x), y))
    module.validation_step((x, y), 0)
    assert float(module.val_loss.compute()) == pytest.approx(float(module.loss(module(x), y)), rel=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_fine_tuning_rate_follows_its_schedule_epoch_by_epoch(spec_backbone, schedule):
    """Cosine: lr * (1 + cos(pi * e / E)) / 2 in epoch e of E (from 0), as each epoch starts; constant: lr."""
    import math

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    spec, backbone = spec_backbone
    net = TransferNet(spec, backbone(), 3)
    module = TransferModule(net, len(net.groups), 1e-3, "adam", 3, schedule=schedule)
    seen = []

    class Rates(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    x, y = torch.randn(8, spec.feature_dim), torch.arange(8) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(max_epochs=4, callbacks=[Rates()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, loader, loader)
    expected = [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 if schedule == "cosine" else 1e-3 for e in range(4)]
    assert seen == pytest.approx(expected, rel=1e-9)


def test_the_closed_form_head_is_the_same_whatever_each_features_scale():
    """Standardized for the fit and mapped back: scaling a feature by any factor changes no logit, so one decay
    means the same on every backbone (without it, a dimension of large values would escape the decay)."""
    import numpy as np

    from transferlab.recipe.head_init import solve_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2, 16)).astype(np.float32)
    labels = [int(v) for v in (x[:, 0, 0] + 0.5 * x[:, 0, 1] + rng.normal(scale=0.7, size=120) > 0) + (x[:, 0, 2] > 1)]
    scale = np.exp(rng.normal(scale=2.0, size=16)).astype(np.float32)  # factors from about 0.02 to 50
    a = solve_head(x, labels, 3, torch.ones(3), seed=0)
    b = solve_head(x * scale, labels, 3, torch.ones(3), seed=0)
    assert a["decay"] == b["decay"] and a["holdout_log_loss"] == pytest.approx(b["holdout_log_loss"], abs=1e-4)
    logits_a = torch.from_numpy(x[:, 0]) @ a["weight"].T + a["bias"]
    logits_b = torch.from_numpy(x[:, 0] * scale) @ b["weight"].T + b["bias"]
    assert torch.allclose(logits_a.softmax(1), logits_b.softmax(1), atol=1e-3)  # logits: up to a shift
    assert 0 < a["holdout_log_loss"] < np.log(3) and 0 <= a["holdout_accuracy"] <= 1
