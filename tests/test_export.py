import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from transferlab.data.images import Preprocess
from transferlab.data.index import index_folder
from transferlab.errors import UserError
from transferlab.inference import export
from transferlab.inference.export import MIN_AGREEMENT, export_run, parity, spread
from transferlab.inference.predictor import from_export, from_run, judgements, predict, probabilities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """Every format of the shared small run (32 validation images, 96 px), int8 where there is one."""
    run, _ = trained_run
    folder = tmp_path_factory.mktemp("export")
    return run, {
        "onnx": export_run(run, "onnx", folder / "m.onnx", dynamic_batch=True, int8=True),
        "torchscript": export_run(run, "torchscript", folder / "m.pt"),
        "tflite": export_run(run, "tflite", folder / "m.tflite", int8=True),
        "hf": export_run(run, "hf", folder / "hf"),
    }


def test_every_float_format_gives_the_trained_models_answers_on_real_images(exported, trained_run):
    _, results = exported
    for fmt, r in results.items():
        assert r["images"] == 32 and r["agreement"] == 1.0, fmt
        assert r["max_prob_difference"] < 1e-4, fmt
        # the trained model's accuracy is the one its own evaluation measured, and each export's equals it
        assert r["trained_accuracy"] == pytest.approx(trained_run[1]["eval_accuracy"], abs=1e-9)
        assert r["accuracy"] == r["trained_accuracy"], fmt
    for fmt in ("onnx", "torchscript", "tflite"):
        assert results[fmt]["max_score_difference"] < 1e-4, fmt


def test_the_report_is_each_files_own_and_travels_with_it(exported, small_data):
    """Recomputed from the exported file on the run's validation images, it is what the metadata stores."""
    run, results = exported
    val = index_folder(small_data, 0.2, 0).val
    paths, labels = [s.path for s in val], np.array([s.label for s in val])
    trained = probabilities(from_run(run), paths)
    for fmt in ("onnx", "torchscript", "tflite"):
        for r in (results[fmt], results[fmt].get("int8")):
            if r is None:
                continue
            probs = probabilities(from_export(r["path"]), paths)
            assert r["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-9)
            assert r["agreement"] == pytest.approx(float((probs.argmax(1) == trained.argmax(1)).mean()), abs=1e-9)
            assert r["max_prob_difference"] == pytest.approx(float(np.abs(probs - trained).max()), abs=1e-6)
            meta = json.loads(Path(r["path"] + ".json").read_text())
            assert meta["parity"] == {k: v for k, v in r.items() if k not in ("path", "format", "int8")}
            assert meta["classes"] == ["ants", "bees"] and meta["image_size"] == 96 and meta["resize"] == "crop"
            assert from_export(r["path"]).classes == ["ants", "bees"]  # read from the file itself
    files = {"transferlab.json": ""}
    torch.jit.load(results["torchscript"]["path"], _extra_files=files)
    assert json.loads(files["transferlab.json"])["parity"]["agreement"] == 1.0


def test_int8_models_are_smaller_and_close_to_the_float_ones(exported):
    """Static int8, calibrated on training images. The reference: on this run's 32 validation images an int8
    model gives the float model's answer on at least 28 and is within 3 images of its accuracy (measured:
    ONNX and TFLite both agree on all 32 at 96 px)."""
    _, results = exported
    for fmt in ("onnx", "tflite"):
        r, q = results[fmt], results[fmt]["int8"]
        assert q["path"].endswith(f".int8.{fmt}")
        assert os.path.getsize(q["path"]) < os.path.getsize(r["path"]) / 2.5, fmt  # int8 weights
        assert q["agreement"] >= 28 / 32 and abs(q["accuracy"] - r["accuracy"]) <= 3 / 32 + 1e-9, fmt
        meta = json.loads(Path(q["path"] + ".json").read_text())
        assert meta["quantization"]["calibration_images"] > 0 and "per channel" in meta["quantization"]["method"]


def test_the_graph_takes_8_bit_rgb_and_normalizes_inside(exported, small_data):
    """The decoded image's own bytes (N x S x S x 3, uint8) through each exported graph give the trained
    model's answer: a caller cannot normalize twice or forget to."""
    run, results = exported
    images = sorted((small_data / "val" / "bees").iterdir())[:4]
    prep = Preprocess.from_meta(json.loads(Path(results["onnx"]["path"] + ".json").read_text()))
    rgb = np.stack([prep.rgb(p) for p in images])
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 96, 96, 3)
    trained, trained_scores = judgements(from_run(run), images)
    import onnxruntime

    session = onnxruntime.InferenceSession(results["onnx"]["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    probs, scores = session.run(None, {"pixels": rgb})
    assert np.abs(probs - trained).max() < 1e-4 and np.abs(scores - trained_scores).max() < 1e-4
    scripted = torch.jit.load(results["torchscript"]["path"])
    for i in range(4):  # traced for one image at a time
        with torch.no_grad():
            p, s = scripted(torch.from_numpy(rgb[i : i + 1]))
        assert np.abs(p.numpy() - trained[i]).max() < 1e-4 and abs(float(s) - trained_scores[i]) < 1e-4
    # floats, or [0, 1] pixels, are refused rather than misread
    with pytest.raises(Exception, match="(?i)type|uint8"):
        session.run(None, {"pixels": rgb.astype(np.float32) / 255})


def test_tflite_runs_on_litert_one_image_at_a_time_as_phones_do(exported, small_data):
    from ai_edge_litert.interpreter import Interpreter

    run, results = exported
    interpreter = Interpreter(model_path=results["tflite"]["path"])
    (source,) = interpreter.get_input_details()
    assert list(source["shape"]) == [1, 96, 96, 3] and source["dtype"] == np.uint8
    images = sorted((small_data / "val" / "ants").iterdir())[:3]
    a = predict(from_run(run), images, k=2)
    b = predict(from_export(results["tflite"]["path"]), images, k=2)
    assert [[t["label"] for t in r["top"]] for r in a] == [[t["label"] for t in r["top"]] for r in b]
    assert all(abs(x["prob"] - y["prob"]) < 1e-4 for ra, rb in zip(a, b) for x, y in zip(ra["top"], rb["top"]))


def test_timm_loads_the_hf_folder_without_transferlab(exported, small_data, tmp_path):
    """In a process that never imports transferlab: timm alone builds the model from the folder, its logits
    give the run's probabilities on the run's input rows, and its data config is the run's preprocessing."""
    run, results = exported
    folder = Path(results["hf"]["path"])
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 2
    assert config["label_names"] == ["ants", "bees"] and config["pretrained_cfg"]["input_size"] == [3, 96, 96]
    assert "accuracy of this folder" in (folder / "README.md").read_text()
    images = sorted((small_data / "val" / "ants").iterdir())[:4]
    prep = Preprocess.from_meta(json.loads((folder / "transferlab.json").read_text()))
    np.save(tmp_path / "x.npy", np.stack([prep.normalized(p) for p in images]))
    code = f"""
import json, sys, numpy as np, timm, torch
model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
with torch.no_grad():
    probs = model(torch.from_numpy(np.load("{tmp_path / "x.npy"}"))).softmax(-1).numpy()
cfg = timm.data.resolve_data_config({{}}, model=model)
print(json.dumps({{"probs": probs.tolist(), "labels": model.pretrained_cfg["label_names"], "cfg": [cfg["input_size"],
    cfg["interpolation"], cfg["mean"], cfg["crop_pct"]], "transferlab": "transferlab" in sys.modules}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["transferlab"] and out["labels"] == ["ants", "bees"]
    assert out["cfg"] == [[3, 96, 96], "bicubic", [0.5, 0.5, 0.5], 0.875]
    assert np.abs(np.array(out["probs"]) - probabilities(from_run(run), images)).max() < 1e-4


def test_a_float_export_that_disagrees_is_not_written(trained_run, tmp_path, monkeypatch):
    """A graph that answers differently (here: its head's classes swapped while saving) is refused in one line,
    and no file is left where it would have been."""
    run, _ = trained_run
    save = export._SAVE["onnx"]

    def swapped(model, example, path, meta):
        head = model.net.head[-1]
        with torch.no_grad():
            head.weight.neg_(), head.bias.neg_()  # one sigmoid logit: the other class
        try:
            save(model, example, path, meta)
        finally:
            with torch.no_grad():
                head.weight.neg_(), head.bias.neg_()

    monkeypatch.setitem(export._SAVE, "onnx", swapped)
    with pytest.raises(UserError, match=rf"not written: .* \(at least {MIN_AGREEMENT:.1%} needed\)"):
        export_run(run, "onnx", tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_parity_counts_answers_and_differences_by_hand():
    """Three images: the export agrees on two; with several labels, an image agrees only if every label does."""
    val = [type("S", (), {"label": label})() for label in (0, 1, 1)]
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55]]), np.array([0.9, 0.8, 0.55])
    got = np.array([[0.8, 0.2], [0.2, 0.8], [0.55, 0.45]]), np.array([0.8, 0.8, 0.55])
    r = parity(ref, got, val, {"classes": ["a", "b"]})
    assert r["images"] == 3 and r["agreement"] == pytest.approx(2 / 3)
    assert r["max_prob_difference"] == pytest.approx(0.1) and r["max_score_difference"] == pytest.approx(0.1)
    assert r["trained_accuracy"] == 1.0 and r["accuracy"] == pytest.approx(2 / 3)
    multi = {"classes": ["a", "b"], "multi_label": True, "label_thresholds": [0.5, 0.5]}
    val = [type("S", (), {"label": labels})() for labels in ((0,), (1,), (0, 1))]
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.7]]), np.zeros(3)
    got = np.array([[0.9, 0.6], [0.2, 0.8], [0.6, 0.7]]), np.zeros(3)
    assert parity(ref, got, val, multi)["agreement"] == pytest.approx(2 / 3)


def test_the_parity_images_are_spread_over_a_list_in_class_order():
    in_class_order = [c for c in "abcde" for _ in range(200)]  # 1,000 validation images, class by class
    assert sorted(set(spread(in_class_order, 500))) == list("abcde") and len(spread(in_class_order, 500)) == 500
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8] and spread([1, 2], 5) == [1, 2]


def test_onnx_predict_equals_run_predict(exported, small_data):
    run, results = exported
    images = sorted((small_data / "val" / "ants").iterdir())[:6]
    a = predict(from_run(run), images, k=2)
    b = predict(from_export(results["onnx"]["path"]), images, k=2)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    for ra, rb in zip(a, b):
        assert [t["label"] for t in ra["top"]] == [t["label"] for t in rb["top"]]
        assert all(abs(ta["prob"] - tb["prob"]) < 1e-4 for ta, tb in zip(ra["top"], rb["top"]))


def test_dynamic_batch_accepts_any_batch_size(exported, small_data):
    _, results = exported
    images = sorted((small_data / "val" / "bees").iterdir())[:3]
    predictor = from_export(results["onnx"]["path"])
    assert not predictor.fixed_batch
    batch = np.stack([predictor.load(p) for p in images])
    whole, scores = predictor.infer(batch)  # one call with the whole batch
    assert whole.shape == (3, 2) and np.allclose(whole.sum(1), 1, atol=1e-5) and scores.shape == (3,)


def test_cli_export_prints_the_report_and_predict_takes_each_format(exported, small_data, tmp_path):
    run, results = exported
    image = sorted((small_data / "val" / "bees").iterdir())[0]
    (own,) = predict(from_run(run), [image], k=2)  # the same image through the run's checkpoint, in this process
    for fmt in ("onnx", "tflite"):
        proc = run_cli("predict", image, "--model", results[fmt]["path"], "--format", "json")
        assert proc.returncode == 0, proc.stderr
        (cli,) = json.loads(proc.stdout)
        assert [t["label"] for t in cli["top"]] == [t["label"] for t in own["top"]]
        assert all(abs(a["prob"] - b["prob"]) < 1e-4 for a, b in zip(cli["top"], own["top"]))
    proc = run_cli("export", run, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert proc.returncode == 0, proc.stderr
    assert "m.pt: the trained model's answer on 100.0% of 32 validation images" in proc.stdout
    foreign = tmp_path / "x.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(UserError, match="transferlab export"):
        from_export(foreign)
    with pytest.raises(UserError, match="--int8 applies to onnx and tflite"):
        export_run(run, "torchscript", tmp_path / "q.pt", int8=True)
