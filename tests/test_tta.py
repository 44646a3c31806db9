"""Test-time augmentation: each image's probabilities averaged with its mirror image's, on every model kind."""

import json

import numpy as np
import pytest
from conftest import SANITY, run_cli

from transferlab.data.images import Preprocess
from transferlab.inference.predictor import Predictor, open_predictor, predict

PREP = Preprocess(32, "bilinear", "crop", 0.875, (0.5,) * 3, (0.5,) * 3)


def _left_heavy(batch: np.ndarray) -> np.ndarray:
    """A model that only looks at the left half: its flip sees the right half, so TTA must change its answer."""
    left = batch[..., : batch.shape[-1] // 2].mean(axis=(1, 2, 3))
    p = 1 / (1 + np.exp(-left))
    return np.stack([1 - p, p], axis=1)


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_tta_is_the_mean_of_the_batch_and_its_horizontal_flip(fixed_batch):
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    batch[..., :16] += 1.0  # left halves brighter: the flip differs
    calls = []

    def infer(x):
        calls.append(len(x))
        probs = _left_heavy(x)
        return probs, probs[:, 0] + 10 * x[:, 0, 0, 0]  # a score that a flip changes

    plain, plain_scores = Predictor(infer, ["a", "b"], PREP, "normalized", fixed_batch=fixed_batch).judge(batch)
    calls.clear()
    tta, tta_scores = Predictor(infer, ["a", "b"], PREP, "normalized", fixed_batch=fixed_batch, tta=True).judge(batch)
    expected = (_left_heavy(batch) + _left_heavy(batch[..., ::-1])) / 2
    assert np.allclose(tta, expected) and not np.allclose(tta, plain)
    # the verdict is the plain image's: the threshold was set on plain views
    np.testing.assert_array_equal(tta_scores, plain_scores)
    assert np.allclose(tta.sum(1), 1)
    assert calls == ([1] * 6 if fixed_batch else [6])  # both copies in one call unless the export takes one image


@pytest.mark.slow
def test_imagenet_head_with_tta_averages_each_real_image_with_its_mirror_and_ignores_a_flip():
    images = sorted(SANITY.glob("*.jpg"))[:3]
    head = open_predictor(backbone="efficientnet_lite0", tta=True)
    rows = np.stack([head.load(p) for p in images])
    got = head(rows)
    head.tta = False
    plain, mirrored = head(rows), head(rows[..., ::-1].copy())
    assert np.abs(got - (plain + mirrored) / 2).max() < 1e-5 and np.abs(plain - mirrored).max() > 1e-4
    head.tta = True
    assert np.abs(head(rows[..., ::-1]) - got).max() < 1e-5  # a mirrored photo gets the same answer
    top = predict(head, images, k=1)
    assert [r["top"][0]["index"] for r in top] == list(got.argmax(1))


@pytest.mark.slow
def test_evaluate_and_predict_take_tta_on_a_run_and_its_onnx_export(trained_run, small_data, tmp_path):
    from transferlab.inference.export import export_run

    run, _ = trained_run
    done = run_cli("evaluate", run, small_data, "--tta", "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["tta"] is True and result["num_images"] == 32
    assert json.loads((run / "evaluation.json").read_text())["tta"] is True
    onnx = export_run(run, "onnx", tmp_path / "m.onnx", dynamic_batch=True)["path"]
    images = sorted((small_data / "val" / "bees").glob("*.jpg"))[:4]
    from_run = predict(open_predictor(run=run, tta=True), images, k=2)
    from_onnx = predict(open_predictor(model=onnx, tta=True), images, k=2)
    for a, b in zip(from_run, from_onnx):
        assert a["top"][0]["label"] == b["top"][0]["label"]
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
    done = run_cli("predict", images[0], "--run", run, "--tta", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["top"][0] == from_run[0]["top"][0]
