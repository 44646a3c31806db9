import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from transferlab.data.index import index_folder
from transferlab.errors import UserError
from transferlab.inference.export import export_run
from transferlab.inference.predictor import from_export, from_run, predict, probabilities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    run, _ = trained_run
    folder = tmp_path_factory.mktemp("export")
    onnx_result = export_run(run, "onnx", folder / "m.onnx", dynamic_batch=True, quantize=True)
    ts_result = export_run(run, "torchscript", folder / "m.pt")
    return run, onnx_result, ts_result


def test_both_formats_match_the_run_on_real_images(exported):
    _, onnx_result, ts_result = exported
    for r in (onnx_result, ts_result):
        assert r["parity_images"] == 32
        assert r["max_prob_difference"] < 1e-4


def test_metadata_travels_with_the_model(exported):
    _, onnx_result, ts_result = exported
    meta = json.loads(Path(onnx_result["path"] + ".json").read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["image_size"] == 96
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["interpolation"] == "bicubic"
    assert meta["resize"] == "crop" and meta["crop_pct"] == 0.875
    files = {"transferlab.json": ""}
    torch.jit.load(ts_result["path"], _extra_files=files)
    assert json.loads(files["transferlab.json"])["classes"] == ["ants", "bees"]


def test_onnx_predict_equals_run_predict(exported, small_data):
    run, onnx_result, _ = exported
    images = sorted((small_data / "val" / "ants").iterdir())[:6]
    a = predict(from_run(run), images, k=2)
    b = predict(from_export(onnx_result["path"]), images, k=2)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    for ra, rb in zip(a, b):
        assert [t["label"] for t in ra["top"]] == [t["label"] for t in rb["top"]]
        assert all(abs(ta["prob"] - tb["prob"]) < 1e-4 for ta, tb in zip(ra["top"], rb["top"]))


def test_dynamic_batch_accepts_any_batch_size(exported, small_data):
    _, onnx_result, _ = exported
    images = sorted((small_data / "val" / "bees").iterdir())[:3]
    predictor = from_export(onnx_result["path"])
    assert not predictor.fixed_batch
    batch = np.stack([predictor.load(p) for p in images])
    whole, scores = predictor.infer(batch)  # one call with the whole batch
    assert whole.shape == (3, 2) and np.allclose(whole.sum(1), 1, atol=1e-5) and scores.shape == (3,)


def test_quantized_model_reports_its_accuracy_next_to_the_float_one(exported, trained_run, small_data):
    """Both figures are the models' own on the run's 32 validation images; int8 stays close to float32."""
    _, r, _ = exported
    assert r["quantized_path"].endswith(".int8.onnx")
    # the float model is the run: its accuracy is the one the run's own evaluation measured
    assert r["float_accuracy"] == pytest.approx(trained_run[1]["eval_accuracy"], abs=1e-9)
    val = index_folder(small_data, 0.2, 0).val
    labels = np.array([s.label for s in val])
    paths = [s.path for s in val]
    float_probs, int8_probs = (probabilities(from_export(p), paths) for p in (r["path"], r["quantized_path"]))
    assert r["int8_accuracy"] == pytest.approx(float((int8_probs.argmax(1) == labels).mean()), abs=1e-9)
    assert r["float_accuracy"] == pytest.approx(float((float_probs.argmax(1) == labels).mean()), abs=1e-9)
    # int8 within 3 of 32 images (0.1) of float32's accuracy, the same label on at least 28 of the 32 (this run:
    # the same accuracy, 30 of 32 agree, probabilities 0.06 apart on average)
    assert abs(r["int8_accuracy"] - r["float_accuracy"]) <= 3 / 32 + 1e-9
    assert (int8_probs.argmax(1) == float_probs.argmax(1)).sum() >= 28
    assert np.abs(int8_probs - float_probs).mean() < 0.1


def test_cli_predict_with_onnx_model_and_a_foreign_file(exported, small_data, tmp_path):
    run, r, _ = exported
    image = sorted((small_data / "val" / "bees").iterdir())[0]
    proc = run_cli("predict", image, "--model", r["path"], "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (cli,) = json.loads(proc.stdout)
    (own,) = predict(from_run(run), [image], k=2)  # the same image through the run's checkpoint, in this process
    assert [t["label"] for t in cli["top"]] == [t["label"] for t in own["top"]]
    assert all(abs(a["prob"] - b["prob"]) < 1e-4 for a, b in zip(cli["top"], own["top"]))
    foreign = tmp_path / "x.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(UserError, match="transferlab export"):
        from_export(foreign)
