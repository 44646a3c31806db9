"""The one result schema and every output format."""

import csv
import io
import json

import numpy as np
import pytest

from transferlab.data.images import Preprocess
from transferlab.errors import UserError
from transferlab.inference.predictor import Predictor, predict, render, top_k

RESULTS = [
    {"image": "a, b.jpg", "top": [{"index": 1, "label": "bees", "prob": 0.75},
                                  {"index": 0, "label": "ants", "prob": 0.25}], "score": 0.75, "unknown": True},
    {"image": "c.png", "top": [{"index": 0, "label": "ants", "prob": 0.9}], "score": 0.9, "unknown": False},
]  # fmt: skip


def test_json_is_the_schema_itself():
    assert json.loads(render(RESULTS, "json")) == RESULTS


def test_csv_has_one_row_per_image_and_rank_and_quotes_what_needs_it():
    rows = list(csv.reader(io.StringIO(render(RESULTS, "csv"))))
    assert rows[0] == ["image", "rank", "index", "label", "prob", "unknown"]
    assert rows[1] == ["a, b.jpg", "1", "1", "bees", "0.750000", "true"]
    assert rows[2][:2] == ["a, b.jpg", "2"] and rows[3] == ["c.png", "1", "0", "ants", "0.900000", "false"]
    assert len(rows) == 4


def test_text_lists_each_image_then_its_classes():
    lines = render(RESULTS, "text").splitlines()
    assert lines[0] == "a, b.jpg  (none of these)" and "75.00%" in lines[1]
    assert lines[1].endswith("bees") and lines[3] == "c.png"


def test_an_unknown_format_is_one_line():
    with pytest.raises(UserError, match="--format 'xml': use one of text, json, csv"):
        render(RESULTS, "xml")


def test_top_k_orders_by_probability_and_judges_by_the_score_never_asking_for_more_classes_than_exist():
    probs = np.array([0.2, 0.5, 0.3])
    r = top_k("x", probs, 0.81234567, ["a", "b", "c"], k=5)
    assert [t["label"] for t in r["top"]] == ["b", "c", "a"]
    assert r["score"] == 0.812346 and r["unknown"] is False  # no threshold: never "none of these"
    assert top_k("x", probs, 0.6, list("abc"), 1, threshold=0.61)["unknown"] is True
    assert top_k("x", probs, 0.6, list("abc"), 1, threshold=0.6)["unknown"] is False  # at the threshold: accepted
    # the verdict is the score's, not the top probability's
    assert top_k("x", probs, 0.1, list("abc"), 1, threshold=0.2)["unknown"] is True


def test_predict_skips_unreadable_files_with_one_warning_and_batches_the_rest(tmp_path):
    from conftest import DATASETS

    good = sorted((DATASETS / "hymenoptera" / "val" / "ants").glob("*.jpg"))[:3]
    (tmp_path / "bad.jpg").write_bytes(b"")
    calls = []

    def infer(batch):
        calls.append(batch.shape)
        return np.tile([0.4, 0.6], (len(batch), 1)), np.full(len(batch), 0.75)

    prep = Preprocess(32, "bilinear", "crop", 0.875, (0.5,) * 3, (0.5,) * 3)
    predictor = Predictor(infer, ["ants", "bees"], prep, inputs="normalized")
    with pytest.warns(UserWarning, match=r"1 file\(s\) are not readable images .*bad.jpg"):
        out = predict(predictor, [good[0], tmp_path / "bad.jpg", *good[1:]], k=1, batch_size=2)
    assert [r["image"] for r in out] == [str(p) for p in good]
    assert calls == [(2, 3, 32, 32), (1, 3, 32, 32)]
    assert out[0]["top"] == [{"index": 1, "label": "bees", "prob": 0.6}] and out[0]["score"] == 0.75


def test_a_network_predicts_through_its_folded_copy_only_when_that_agrees(monkeypatch):
    """BatchNorm folded into the convolutions gives the network's probabilities; a copy that does not is refused."""
    import copy

    import torch
    from conftest import DATASETS

    from transferlab.inference import predictor as inference
    from transferlab.model import network as model
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import get_spec

    spec = get_spec("efficientnet_lite0")
    net = model.TransferNet(spec, create_backbone(spec)[0], num_classes=3).eval()
    prep = Preprocess(96, spec.interpolation, "crop", spec.crop_pct, spec.mean, spec.std)
    x = np.stack([prep.normalized(p) for p in sorted((DATASETS / "hymenoptera" / "val" / "bees").glob("*.jpg"))[:6]])
    with torch.inference_mode():
        expected = model.logits_to_probabilities(net(torch.from_numpy(x))).numpy()
    fold, calls = model.fold_batchnorm, []
    judged = model.Judged(net)

    def counted(make):
        def fold_counted(module):
            copied = make(module)
            copied.register_forward_hook(lambda _, args, out: calls.append(len(args[0])))
            return copied

        return fold_counted

    monkeypatch.setattr(model, "fold_batchnorm", counted(fold))
    predictor = Predictor(inference._torch_infer(judged, fold=True), list("abc"), prep, "normalized")
    np.testing.assert_allclose(predictor(x), expected, atol=1e-5)
    assert calls == [2, 6]  # checked on the first two images, then used for the batch
    assert predictor.images == 6 and predictor.seconds > 0  # what the report's images per second comes from

    def broken(module):
        copied = fold(module)
        copied.net.head[1].bias.data[0] += 1.0  # computes something else: the network itself must be used
        return copied

    calls.clear()
    monkeypatch.setattr(model, "fold_batchnorm", counted(broken))
    infer = inference._torch_infer(copy.deepcopy(judged), fold=True)
    np.testing.assert_allclose(infer(x)[0], expected, atol=1e-6)
    np.testing.assert_allclose(infer(x)[0], expected, atol=1e-6)
    assert calls == [2]  # refused after its check, never used again
