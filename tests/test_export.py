import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from transferlab.errors import UserError
from transferlab.inference.export import export_run
from transferlab.inference.predictor import from_export, from_run, predict

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
    whole = predictor.infer(batch)  # one call with the whole batch
    assert whole.shape == (3, 2) and np.allclose(whole.sum(1), 1, atol=1e-5)


def test_quantized_model_reports_its_accuracy_next_to_the_float_one(exported):
    _, r, _ = exported
    assert 0.5 < r["float_accuracy"] <= 1 and 0.5 <= r["int8_accuracy"] <= 1
    assert r["quantized_path"].endswith(".int8.onnx")


def test_cli_predict_with_onnx_model_and_a_foreign_file(exported, small_data, tmp_path):
    _, r, _ = exported
    image = sorted((small_data / "val" / "bees").iterdir())[0]
    proc = run_cli("predict", image, "--model", r["path"], "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["top"][0]["label"] in ("ants", "bees")
    foreign = tmp_path / "x.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(UserError, match="transferlab export"):
        from_export(foreign)
