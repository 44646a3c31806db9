"""The "none of these" scores and how their separation is measured (inference/unknown.py), on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.inference.unknown import ClassMeans, Neighbours, class_logits, energy, separation, top_probability


def test_separation_counts_pairs_with_ties_as_half():
    # pairs (known, outside): 3>1, 3>2, 2>1 and 2=2 (half): 3.5 of 4
    r = separation(np.array([3.0, 2.0]), np.array([1.0, 2.0]), accept=1.0)
    assert r["auroc"] == 0.875
    assert r["known_accepted"] == 1.0 and r["outside_accepted"] == 0.5  # at the lowest known score, 2: the outside 2
    r = separation(np.arange(21.0), np.arange(21.0) - 100, accept=0.95)  # the lowest of 21 known images refused
    assert r == {"auroc": 1.0, "known_accepted": round(20 / 21, 4), "outside_accepted": 0.0}


def test_logit_scores_for_both_head_shapes():
    z = np.array([[2.0, 0.0, -1.0]])
    assert top_probability(z)[0] == pytest.approx(np.exp(2) / (np.exp(2) + 1 + np.exp(-1)))
    assert energy(z)[0] == pytest.approx(np.log(np.exp(2) + 1 + np.exp(-1)))
    one = np.array([[1.5], [-1.5]])  # a two-class head's single logit is the pair (0, z)
    assert class_logits(one).tolist() == [[0.0, 1.5], [0.0, -1.5]]
    assert top_probability(one) == pytest.approx([1 / (1 + np.exp(-1.5))] * 2)


def test_class_means_is_the_distance_to_the_nearest_mean():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(10, 1, (200, 3))])
    labels = np.repeat([0, 1], 200)
    score = ClassMeans(x, labels, shrinkage=1.0)  # all shrinkage: the covariance is a multiple of the identity
    scale = np.sqrt(score.precision[0, 0])
    probe = np.array([[0.0, 0.0, 0.0], [10.0, 10.0, 13.0], [5.0, 5.0, 5.0]])
    nearest = np.min(np.linalg.norm(probe[:, None] - score.means[None], axis=2), axis=1)
    assert score(probe) == pytest.approx(-nearest * scale)
    assert score(probe)[2] < score(probe)[1] < score(probe)[0]  # midway between the classes is the least known


def test_neighbours_is_the_distance_to_the_kth_nearest_normalized_feature():
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert Neighbours(bank, k=1)(bank) == pytest.approx([0, 0, 0])  # each is its own nearest
    # (1, 1)/sqrt(2) is at distance sqrt(2 - sqrt(2)) from (1, 0) and from (0, 1), and the second nearest is as far
    assert Neighbours(bank, k=2)(np.array([[5.0, 5.0]]))[0] == pytest.approx(-np.sqrt(2 - np.sqrt(2)))
    assert Neighbours(bank, k=10).k == 3  # never more neighbours than images


def test_the_training_images_features_travel_with_the_weights_and_any_checkpoint_loads():
    """best.ckpt after a finish holds them; a training epoch's weights (last.ckpt, a resume, an older run) do not:
    both load into a fresh network, which then keeps them or keeps none."""
    import torch

    from transferlab.model.network import TransferNet
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import get_spec

    spec = get_spec("efficientnet_lite0")
    a, b = (TransferNet(spec, create_backbone(spec, pretrained=False)[0], 3) for _ in range(2))
    plain = {k: v.clone() for k, v in a.state_dict().items()}
    a.set_bank(torch.randn(300, spec.feature_dim), 10)
    assert a.neighbours == 10 and {"bank", "bank_k"} <= set(a.state_dict())
    b.load_state_dict(a.state_dict())
    assert b.neighbours == 10 and torch.equal(b.bank, a.bank)
    x = torch.randn(4, spec.feature_dim)
    assert torch.equal(b.similarity(x), a.similarity(x))
    b.load_state_dict(plain)  # strict: no missing or unexpected key either way
    assert b.bank is None and b.neighbours == 0
    a.set_bank(torch.randn(32, spec.feature_dim), 10)
    assert a.neighbours == 1  # one in twenty of a small set
