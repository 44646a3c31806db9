"""Every script in benchmarks/ runs at its smallest size and prints or writes its figures, so none rots unseen.

Each script runs as a user runs it (its own process, its own command line) on a few real images, or on the
shared small run; the assertions read what it printed or wrote. peers.py runs without its fastai peer (an
optional extra, not installed here): its transferlab and textbook rows only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATASETS, ROOT, make_subset

BENCHMARKS = ROOT / "benchmarks"
COVERED = {
    "cache_scale", "compile", "decode", "defaults", "export_speed", "finetune_options", "head_init", "image_size",
    "imbalance", "multi_label", "multi_layer", "open_world", "peers", "precision", "project_flow", "projection",
    "serve_load", "speed", "tta",
}  # fmt: skip


def test_every_benchmark_script_has_a_smoke_run_here():
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == COVERED


def script(name: str, *args, timeout: float = 240) -> str:
    """Run benchmarks/NAME.py ARGS; its stdout, once it has succeeded."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def table(out: str) -> list[dict]:
    """The rows of the last Markdown table printed, by column name."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def share_of(value: float, images: int) -> bool:
    """Whether ``value`` is an accuracy on ``images`` images (k of them right, rounded to 4 places)."""
    return 0 <= value <= 1 and abs(value * images - round(value * images)) < 1e-3 * images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Eight training and four validation images (ants and bees)."""
    return make_subset(tmp_path_factory.mktemp("bench") / "hym", train=4, val=2)


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory) -> tuple[Path, dict]:
    """The shared small run (32 validation images), copied: the scripts write into a run and serve its folder."""
    run, metrics = trained_run
    copy = tmp_path_factory.mktemp("runs") / "tiny"
    shutil.copytree(run, copy, symlinks=True, ignore=shutil.ignore_patterns("cache"))
    return copy, metrics


# --- a few images, no training -------------------------------------------------------------------


@pytest.mark.slow
def test_decode(tiny):
    (r,) = json_lines(script("decode", tiny, "--image-size", 64, "--rounds", 1))
    assert r["images"] == 12 and r["image_size"] == 64
    assert r["speedup"] == pytest.approx(r["whole_seconds"] / r["reduced_seconds"], rel=0.02, abs=0.02)
    assert 0 <= r["mean_abs_pixel_difference"] < 10  # of 255: decoding at a reduced scale keeps the picture


@pytest.mark.slow
def test_project_flow():
    (r,) = json_lines(script("project_flow", "--per-class", 4, "--budget", 30, "--image-size", 64))
    assert r["images"] == 12 and r["image_size"] == 64 and r["state"] == "finished"
    assert 0 <= r["best_val_accuracy"] <= 1 and r["review_state"] == "ready" and r["review_says_what_it_does"]
    assert 0 < r["first_epoch_shown_seconds"] <= r["train_seconds"] and r["upload_seconds"] > 0


@pytest.mark.slow
def test_cache_scale(tiny):
    (r,) = json_lines(script("cache_scale", "--data", tiny, "--images", 8, "--image-size", 64, "--views", 1))
    assert r["images"] == r["extracted"] == r["files"] == 8 and r["views"] == 1
    assert r["bytes_on_disk"] >= 8 * 1280 * 2  # a half-precision Lite0 feature vector per image, at least
    assert r["preloaded_in_memory"] and not r["memory_mapped_in_memory"]


@pytest.mark.slow
def test_precision(tiny):
    (r,) = json_lines(script("precision", "--data", tiny, "--image-size", 64, "--rounds", 1, "--workers", 0))
    assert r["images"] == 12 and r["used_32"] == ["32"] and set(r["used_bf16"]) <= {"32", "bf16"}
    for precision in ("32", "bf16"):
        assert share_of(r[f"probe_val_accuracy_{precision}"], 4)
    assert r["speedup_bf16"] == pytest.approx(r["images_per_second_bf16"] / r["images_per_second_32"], rel=0.1)


@pytest.mark.slow
def test_projection(tiny):
    out = script("projection", "--data", tiny, "--backbones", "efficientnet_lite0", "--image-size", 64,
                 "--sample", 4, "--batch-size", 4)  # fmt: skip
    (r,) = json_lines(out)
    assert r["backbone"] == "efficientnet_lite0" and r["precision"] in ("32", "bf16")
    assert r["extract_images_per_second"] > 0 and r["fine_tune_images_per_second"] > 0
    assert "8 training and 4 validation images, 64 px" in out
    (row,) = table(out)
    assert row["backbone"] == "efficientnet_lite0" and float(row["projected_total_hours"]) == r["projected_total_hours"]


@pytest.mark.slow
def test_image_size(tiny):
    (row,) = table(script("image_size", tiny, "--sizes", 64))
    assert row["size"] == "64" and len(row) == 2 + 5  # size, seconds, one accuracy per weight decay
    accuracies = [float(v) for k, v in row.items() if k.startswith("decay")]
    assert len(accuracies) == 5 and all(share_of(a, 4) for a in accuracies)


def test_multi_layer(tiny):
    out = script("multi_layer", tiny, "--size", 64, "--workers", 0)
    facts, rows = json.loads(out.splitlines()[0]), table(out)
    assert facts["size"] == 64 and (facts["train"], facts["val"]) == (8, 4) and len(facts["groups"]) == 9
    assert [r["variant"] for r in rows] == ["last", "last2", "all"]
    widths = [int(r["width"]) for r in rows]
    assert widths == [1280, 1280 + facts["groups"][-2], sum(facts["groups"])] and facts["groups"][-1] == 1280
    for r, width in zip(rows, widths):
        assert share_of(float(r["held-out accuracy"]), 4) and float(r["held-out log-loss"]) > 0
        assert float(r["store (MB)"]) == pytest.approx(width * 2 * 12 / 1e6, abs=0.05)


@pytest.mark.slow
def test_compile(tiny):
    # the "eager" backend traces with torch.compile without generating code: minutes of inductor saved
    out = script("compile", "--data", tiny, "--image-size", 64, "--batch", 4, "--repeats", 1, "--backend", "eager")
    r = json.loads(out)
    assert r["batch"] == 4 and r["backend"] == "eager"
    assert r["eager_32"]["min_cosine_vs_eager_32"] == pytest.approx(1, abs=1e-5)
    assert r["compiled_32"]["min_cosine_vs_eager_32"] == pytest.approx(1, abs=1e-4)  # the same computation
    assert r["eager_bf16"]["min_cosine_vs_eager_32"] > 0.99
    for precision in ("32", "bf16"):
        pays_off = r[f"compile_pays_off_after_images_{precision}"]
        assert pays_off == "never" or (isinstance(pays_off, int) and pays_off >= 0)


# --- small training runs -------------------------------------------------------------------------


@pytest.mark.slow
def test_imbalance(tiny):
    out = script("imbalance", "--data", tiny, "--image-size", 64, "--epochs", 1, "--fine-tune-epochs", 0,
                 "--workers", 0, "--fraction", 0.5)  # fmt: skip
    assert "train/bees cut to 2 images, 64 px, seed 0, 1 + 0 epochs" in out
    rows = table(out)
    assert [r["balance"] for r in rows] == ["False", "True"]
    for r in rows:
        recalls = float(r["recall_bees"]), float(r["min_recall"])
        assert recalls[1] <= recalls[0] and recalls[1] <= float(r["balanced_accuracy"])


@pytest.mark.slow
def test_finetune_options(tiny, tmp_path):
    out = script("finetune_options", tiny, "--image-size", 64, "--variants", "default,label_smoothing",
                 "--epochs", 1, "--fine-tune-epochs", 1, "--json", tmp_path / "rows.json")  # fmt: skip
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert json_lines(out) == rows and [r["variant"] for r in rows] == ["default", "label_smoothing"]
    for r in rows:
        assert r["best_val_accuracy"] == max(r["head"], r["feature_extraction_best"], r["fine_tune_best"])
        assert re.fullmatch(r"[012] of 2", r["best_epoch"])
    assert [r["variant"] for r in table(out)] == ["default", "label_smoothing"]


@pytest.mark.slow
def test_head_init(tiny, tmp_path):
    out = script("head_init", "--datasets", tiny.parent, "--sets", tiny.name, "--image-size", 64, "--epochs", 1,
                 "--out", tmp_path)  # fmt: skip
    rows = json_lines(out)
    assert [(r["data"], r["size"], r["head_start"]) for r in rows] == [("hym", 64, "random"), ("hym", 64, "lbfgs")]
    assert rows[0]["head_fit"] is None and rows[1]["head_fit"] is not None  # only the L-BFGS start fits a head
    assert rows[0]["epoch_0_val_accuracy"] is None and share_of(rows[1]["epoch_0_val_accuracy"], 4)
    for r in rows:  # one epoch: the best is it, or the L-BFGS head scored before it (epoch 0; equals: by the loss)
        scored = {e: r[f"epoch_{e}_val_accuracy"] for e in (0, 1) if r[f"epoch_{e}_val_accuracy"] is not None}
        assert r["best_val_accuracy"] == max(scored.values()) == scored[r["best_epoch"]]
    assert [r["head_start"] for r in table(out)] == ["random", "lbfgs"]


@pytest.mark.slow
def test_speed(tiny, tmp_path):
    script("speed", "--data", tiny, "--image-size", 64, "--epochs", 1, "--fine-tune-epochs", 1,
           "--throughput-images", 8, "--out", tmp_path)  # fmt: skip
    r = json.loads((tmp_path / "speed.json").read_text())
    assert r["extraction"]["images"] == 8 and r["extraction"]["ratio"] > 0
    assert r["speedup_end_to_end"] == pytest.approx(r["none"]["wall_seconds"] / r["disk"]["wall_seconds"], abs=0.01)
    for cache in ("disk", "none"):
        assert r[cache]["best_epoch"] in (0, 1, 2) and share_of(r[cache]["best_val_accuracy"], 4)  # 0: the head


@pytest.mark.slow
def test_peers_without_fastai(tmp_path):
    out = script("peers", "--sets", "hymenoptera:64", "--limit", 2, "--epochs", 1, "--fine-tune-epochs", 1,
                 "--workers", 0, "--skip", "fastai", "--json", tmp_path / "rows.json")  # fmt: skip
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert json_lines(out) == [row] and row["set"] == "hymenoptera" and row["size"] == 64
    assert row["textbook_s/transferlab"] == pytest.approx(row["textbook_s"] / row["transferlab_s"], abs=0.02)
    for peer in ("transferlab", "textbook"):
        assert share_of(row[f"{peer}_acc"], 4)  # 4 held-out images
    assert "fastai_acc" not in row and table(out)[0]["set"] == "hymenoptera"


# --- the shared small run ------------------------------------------------------------------------


@pytest.mark.slow
def test_export_speed(run_copy):
    run, metrics = run_copy
    script("export_speed", run, "--batch-size", 16, "--repeats", 1, "--formats", "torchscript,onnx")
    r = json.loads((run / "export_speed.json").read_text())
    assert r["images"] == 32 and r["image_size"] == 96
    rows = {(row["format"], row["batch"]): row for row in r["rows"]}
    assert set(rows) == {(f, b) for f in ("pytorch", "torchscript", "onnx", "onnx_int8") for b in (16, 1)}
    for name in ("pytorch", "torchscript", "onnx"):  # the run, three ways
        assert rows[name, 16]["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4), name
        assert rows[name, 16]["agreement"] == 1.0 and rows[name, 1]["images_per_second"] > 0
    assert abs(rows["onnx_int8", 16]["accuracy"] - metrics["eval_accuracy"]) <= 3 / 32 + 1e-4
    assert rows["onnx_int8", 16]["agreement"] >= 28 / 32


@pytest.mark.slow
def test_tta(run_copy, small_data, tmp_path):
    run, metrics = run_copy
    out = script("tta", run, small_data, "--workers", 0, "--json", tmp_path / "rows.json")
    (r,) = json.loads((tmp_path / "rows.json").read_text())
    assert r["run"] == run.name and r["images"] == 32
    assert r["acc_plain"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)  # plain is the run's own evaluation
    assert r["time_ratio"] == pytest.approx(r["s_tta"] / r["s_plain"], abs=0.05)
    assert table(out)[0]["run"] == run.name


@pytest.mark.slow
def test_serve_load(run_copy):
    run, _ = run_copy
    r = json.loads(script("serve_load", run, "--requests", 4, "--concurrency", 2))
    assert r["requests"] == 4 and r["errors"] == 0 and r["backbone"] == "efficientnet_lite0" and r["image_size"] == 96
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["max_ms"] and r["requests_per_second"] > 0


@pytest.mark.slow
def test_defaults(tmp_path):
    tiny = ["--", "--epochs", "1", "--fine-tune-epochs", "1", "--workers", "0"]
    out = script("defaults", "--sets", "hym_small", "--ways", "default,probe", "--out", tmp_path, "--json",
                 tmp_path / "rows.json", *tiny)  # fmt: skip
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["set"] == "hym_small" and row["classes"] == 2 and row["train_images"] == 16
    assert share_of(row["default"], 16) and share_of(row["probe"], 16) and row["default_s"] > 0
    metrics = json.loads((tmp_path / "runs" / "hym_small" / "default" / "metrics.json").read_text())
    assert row["default"] == metrics["best_val_accuracy"] and metrics["image_size"] == 96
    assert table(out)[0]["set"] == "hym_small"
    assert all((tmp_path / "data" / "hym_small" / "train" / c).is_dir() for c in ("ants", "bees"))


@pytest.mark.slow
def test_multi_label(tmp_path):
    out = script("multi_label", "--train", 40, "--val", 20, "--tile", 32, "--out", tmp_path, "--json",
                 tmp_path / "rows.json", "--", "--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1",
                 "--workers", "0")  # fmt: skip
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["way"] for r in rows] == ["default recipe", "probe (frozen features)"]
    assert all(0 < r["map"] <= 1 and 0 <= r["micro_f1"] <= 1 and share_of(r["accuracy"], 20) for r in rows)
    assert [r["way"] for r in table(out)] == ["default recipe", "probe (frozen features)"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rows[0]["map"] == metrics["eval_map"] and metrics["num_val_images"] == 20


@pytest.mark.slow
def test_open_world(run_copy, small_data, tmp_path):
    outside = tmp_path / "cifar"
    outside.mkdir()
    for p in sorted((DATASETS / "cifar10_5k" / "test" / "truck").iterdir())[:6]:
        shutil.copy(p, outside / p.name)
    out = script("open_world", run_copy[0], small_data, "--outside", f"trucks={outside}", "--k", 3,
                 "--workers", 0, "--json", tmp_path / "rows.json")  # fmt: skip
    rows = json.loads((tmp_path / "rows.json").read_text())
    names = ["top probability", "energy", "class means (Mahalanobis)", "3 nearest neighbours"]
    assert [r["score"] for r in rows] == names
    for r in rows:
        assert r["outside"] == "trucks" and r["images"].endswith("/ 6")
        known = int(r["images"].split(" / ")[0])
        assert share_of(r["known_accepted"], known) and r["known_accepted"] >= 0.95
        assert share_of(r["outside_accepted"], 6) and 0 <= r["auroc"] <= 1
        assert share_of(r["auroc"], known * 6 * 2)  # a count of pairs, ties counting half
    assert [r["score"] for r in table(out)] == [r["score"] for r in rows]
