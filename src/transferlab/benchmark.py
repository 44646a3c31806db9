"""Compare backbones on one dataset with the same recipe: a leaderboard, a chart and an ablation.

Each backbone trains in its own process (``transferlab train``) and run directory under the
benchmark directory, so one that fails (no weights, out of memory) gets a row with the reason
while the others go on, its peak memory is its own, and a re-run skips finished backbones and
resumes unfinished ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferlab.data import index_folder, median_side
from transferlab.errors import UserError
from transferlab.files import atomic_write, markdown_table
from transferlab.run import RunDir
from transferlab.zoo import expand_names, get_spec

COLUMNS = [
    "model", "best_epoch", "train_accuracy_best", "val_accuracy_best", "val_loss_best", "params", "image_size",
    "train_seconds", "images_per_second", "peak_memory_mb", "status",
]  # fmt: skip

# The preprocessing ablation: what broke MobileNetV2 and InceptionV3 in the classic Keras table.
ABLATION = {
    "default": ([], "transferlab's defaults: the backbone's own normalization and input size, BatchNorm frozen"),
    "raw_pixels": (["--pixels", "raw255"], "0-255 pixels, not normalized the way the backbone was trained"),
    "original_size": (["--image-size", "{side}"], "images kept at their original {side}x{side} size, not upsampled"),
    "bn_training_mode": (
        ["--bn-mode", "train", "--cache", "none"],
        "BatchNorm left in training mode while the backbone is frozen and fine-tuned",
    ),
}


def _run_one(data_dir: str, run_dir: Path, backbone: str, train_args: list[str]) -> tuple[str, float]:
    """Train (or resume) one run in a child process; returns (status, peak memory in MB)."""
    rd = RunDir(run_dir)
    if rd.finished():
        return "done (reused)", float(rd.read_metrics().get("peak_memory_mb", 0.0))
    if rd.last.is_file():
        cmd = ["train", "--resume", str(run_dir)]
    else:
        cmd = ["train", data_dir, "--backbone", backbone, "--out", str(run_dir), "--overwrite", *train_args]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "transferlab", *cmd], stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        code = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read()
    peak_mb = round(usage.ru_maxrss / 1024, 1)
    if code == 0:
        return "done", peak_mb
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    if code < 0:
        return f"failed: killed by signal {-code} (out of memory?)", peak_mb
    reason = lines[-1].removeprefix("error: ") if lines else (err.strip().splitlines() or ["unknown error"])[-1]
    if "no pretrained weights" in reason:
        reason = "weights not available: " + reason
    return f"failed: {reason}", peak_mb


def _row(name: str, run_dir: Path, status: str, peak_mb: float) -> dict:
    rd = RunDir(run_dir)
    if not rd.finished():
        return {"model": name, "status": status}
    m = rd.read_metrics()
    if peak_mb and "peak_memory_mb" not in m:
        m["peak_memory_mb"] = peak_mb
        rd.write_json("metrics.json", m)
    return {
        "model": name,
        "best_epoch": m["best_epoch"],
        "train_accuracy_best": m["best_train_accuracy"],
        "val_accuracy_best": m["best_val_accuracy"],
        "val_loss_best": m["best_val_loss"],
        "params": m.get("params"),
        "image_size": m["image_size"],
        "train_seconds": m["train_seconds"],
        "images_per_second": m.get("images_per_second"),
        "peak_memory_mb": m.get("peak_memory_mb") or None,
        "status": status,
    }


def run_benchmark(
    data_dir: str | Path, backbones: str | list[str], out: str | Path, train_args: list[str] | None = None
) -> list[dict]:
    """Train every backbone with the same options; write and return the sorted leaderboard."""
    names = expand_names(backbones)
    if not names:
        raise UserError("no backbones given: pass --backbones a,b,c (or keras7, lite)")
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder not found: {data_dir}: pass a folder with one sub-folder per class")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = list(train_args or [])
    if "--cache-dir" not in args:
        args += ["--cache-dir", str(out / "cache")]  # backbones and re-runs share extracted features
    rows = []
    for name in names:
        run_dir = out / _safe(name)
        start = time.perf_counter()
        status, peak = _run_one(str(data_dir), run_dir, name, args)
        print(f"{name}: {status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        rows.append(_row(name, run_dir, status, peak))
        write_leaderboard(rows, out)
    return sort_rows(rows)


def run_ablation(
    data_dir: str | Path, backbone: str, out: str | Path, train_args: list[str] | None = None
) -> list[dict]:
    """The same training of one backbone with each preprocessing mistake of the classic comparison."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    base = list(train_args or []) + ["--cache-dir", str(out / "cache")]
    side = str(max(median_side(index_folder(data_dir).train), get_spec(backbone).min_size))
    for variant, (extra, meaning) in ABLATION.items():
        run_dir = out / variant
        extra, meaning = [a.replace("{side}", side) for a in extra], meaning.replace("{side}", side)
        args = _override(base, extra)
        status, peak = _run_one(str(data_dir), run_dir, backbone, args)
        print(f"{variant}: {status}", file=sys.stderr, flush=True)
        row = _row(variant, run_dir, status, peak)
        row["meaning"] = meaning
        rows.append(row)
        write_leaderboard(rows, out, extra_columns=["meaning"], sort=False)
    return rows


def _override(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with the options in ``extra`` replacing any earlier value of the same option."""
    flags = {extra[i] for i in range(0, len(extra), 2)}
    kept, i = [], 0
    while i < len(args):
        if args[i] in flags:
            i += 2
            continue
        kept.append(args[i])
        i += 1
    return kept + extra


def _safe(name: str) -> str:
    """A folder name that stays inside the benchmark directory whatever the backbone name holds."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "backbone"


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get("val_accuracy_best") is None, -(r.get("val_accuracy_best") or 0)))


def write_leaderboard(rows: list[dict], out: Path, extra_columns: list[str] | None = None, sort: bool = True) -> None:
    rows = sort_rows(rows) if sort else rows
    columns = COLUMNS + (extra_columns or [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "leaderboard.csv", buf.getvalue())
    atomic_write(out / "leaderboard.md", markdown_table(rows, columns) + "\n")
    atomic_write(out / "leaderboard.json", json.dumps(rows, indent=2))
    plot_comparison(rows, out)


def plot_comparison(rows: list[dict], out: Path) -> None:
    """Val accuracy per epoch for every backbone, and best val accuracy against train time."""
    from transferlab.plots import plt, save_figure

    fig, (curves, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        history = RunDir(out / _safe(r["model"])).read_history()
        if history and r.get("val_accuracy_best") is not None:
            curves.plot([h["epoch"] for h in history], [h["val_accuracy"] for h in history], "o-", label=r["model"])
            cost.scatter(r["train_seconds"], r["val_accuracy_best"])
            cost.annotate(r["model"], (r["train_seconds"], r["val_accuracy_best"]), fontsize=8)
    curves.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per epoch")
    cost.set(xlabel="train time (s)", ylabel="best validation accuracy", title="accuracy against train time")
    for ax in (curves, cost):
        ax.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize=8)
    save_figure(fig, out / "comparison.png")
