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
def test_the_fine_tuning_rate_follows_its_schedule_step_by_step(spec_backbone, schedule):
    """Cosine: lr * (1 + cos(pi * t / T)) / 2 at optimizer step t of T (from 0): so lr * (1 + cos(pi * e / E)) / 2
    as epoch e of E starts, falling within each epoch too, near zero at the last step; constant: lr."""
    import math

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    spec, backbone = spec_backbone
    net = TransferNet(spec, backbone(), 3)
    module = TransferModule(net, len(net.groups), 1e-3, "adam", 3, schedule=schedule)
    seen = []

    stepped = []

    class Rates(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stepped.append(trainer.optimizers[0].param_groups[0]["lr"])

    x, y = torch.randn(8, spec.feature_dim), torch.arange(8) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(max_epochs=4, callbacks=[Rates()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, loader, loader)
    expected = [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 if schedule == "cosine" else 1e-3 for e in range(4)]
    assert seen == pytest.approx(expected, rel=1e-9)
    # two batches an epoch: eight steps, the rate of each batch
    expected = [1e-3 * (1 + math.cos(math.pi * t / 8)) / 2 if schedule == "cosine" else 1e-3 for t in range(8)]
    assert stepped == pytest.approx(expected, rel=1e-9)
    if schedule == "cosine":
        assert stepped[-1] < 0.04 * stepped[0]  # the last epoch near zero (per epoch it would train at a seventh)


def test_a_falling_cosine_planned_again_falls_on_from_its_rate_and_resumes_along_its_curve():
    """The time budget plans the epochs again after each one (``replan``): shorter or longer, the rate falls on from
    where it is to zero at the new end, never rising. Its state (what a checkpoint keeps) brings a fresh scheduler
    back onto the same curve; a per-epoch cosine's state (CosineAnnealingLR, before) goes on from its own rate."""
    import io
    import math

    from transferlab.recipe.module import FallingCosine

    def scheduler(epochs: int, steps: int) -> tuple[torch.optim.Optimizer, FallingCosine]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, FallingCosine(optimizer, epochs, steps)

    def steps(optimizer, cosine, n: int) -> list[float]:
        rates = []
        for _ in range(n):
            optimizer.step()
            cosine.step()
            rates.append(optimizer.param_groups[0]["lr"])
        return rates

    optimizer, cosine = scheduler(3, 10)
    assert steps(optimizer, cosine, 10)[-1] == pytest.approx((1 + math.cos(math.pi * 10 / 30)) / 2)  # 0.75
    cosine.replan(5)  # longer: from 0.75, not up to the 0.905 a five-epoch curve has at step 10
    longer = steps(optimizer, cosine, 10)
    assert longer[0] == pytest.approx(0.75 * (1 + math.cos(math.pi / 40)) / 2)
    cosine.replan(3)  # shorter again: from where it is down to zero at step 30
    shorter = steps(optimizer, cosine, 20)
    rates = longer + shorter
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False) if a > 0) and rates[-1] == 0
    assert shorter[9] == 0 and max(shorter[:9]) < longer[-1]  # zero at the end of epoch 3, and stays there

    optimizer, cosine = scheduler(3, 10)
    steps(optimizer, cosine, 12)
    cosine.replan(2)
    steps(optimizer, cosine, 1)
    buffer = io.BytesIO()
    torch.save(cosine.state_dict(), buffer)  # as a checkpoint keeps it, and read back as a resume reads it
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_optimizer, fresh = scheduler(9, 1)  # as a resumed run builds it, before the checkpoint loads
    fresh.load_state_dict(saved)
    assert (fresh.epochs, fresh.steps) == (2, 10)
    assert steps(resumed_optimizer, fresh, 7) == pytest.approx(steps(optimizer, cosine, 7), abs=1e-12)

    # a per-epoch cosine's checkpoint, 1 epoch of 3 done, at the rate it reached (0.6: its T_max was planned again,
    # so not the 0.75 of a closed form): on from 0.6 to zero at step 30
    old = {"T_max": 3, "eta_min": 0.0, "last_epoch": 1, "base_lrs": [1.0], "_last_lr": [0.6]}
    optimizer, fresh = scheduler(3, 10)
    fresh.load_state_dict(old)
    assert "T_max" not in fresh.state_dict() and (fresh.epochs, fresh.last_epoch) == (3, 10)
    after = steps(optimizer, fresh, 20)
    assert after[0] == pytest.approx(0.6 * (1 + math.cos(math.pi / 20)) / 2) and after[-1] == 0


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
