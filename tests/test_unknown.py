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
