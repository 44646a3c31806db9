"""What a runs folder holds: runs (config.yaml) and benchmarks (leaderboard.json), found by name safely.

A name is a path under the runs folder (``photos`` or ``benchmark-photos/efficientnet_lite0``);
one with ``..``, an absolute path or a backslash is refused before any file is touched. A run
without metrics.json is "training" while its files changed in the last ``LIVE_SECONDS`` (a run
writes history.csv and last.ckpt every epoch, curves.png every 15 s at most), else "stopped" (resume it).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

from transferlab.run import RunDir

LIVE_SECONDS = 600
SKIP = {"cache", "checkpoints", "lightning_logs"}
MAX_DEPTH = 3
FILES = {
    "curves.png", "confusion_matrix.png", "augmentations.png", "evaluation.png", "review.png", "comparison.png",
}  # fmt: skip


class BadName(ValueError):
    """A run name that could leave the runs folder."""


def resolve(root: Path, name: str) -> Path:
    """The folder ``name`` names under ``root``; BadName for a name that could point outside it."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise BadName(f"bad run name {name!r}: use a name from /api/runs (a path inside the runs folder, no '..')")
    return root / name


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def is_benchmark(path: Path) -> bool:
    return (path / "leaderboard.json").is_file()


def discover(root: Path) -> list[dict]:
    """Every run and benchmark under ``root`` (benchmarks' own runs included), newest first."""
    found = []
    for folder, dirs, _ in os.walk(root):
        path = Path(folder)
        depth = len(path.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith(".")) if depth < MAX_DEPTH else []
        if path == root:
            continue
        name = path.relative_to(root).as_posix()
        if is_run(path):
            found.append(run_summary(path, name))
            dirs[:] = []
        elif is_benchmark(path):
            found.append(benchmark_summary(path, name))
    return sorted(found, key=lambda e: e["updated"], reverse=True)


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def run_summary(path: Path, name: str) -> dict:
    """One row of the runs page: backbone, data, best accuracy, date, status and progress."""
    rd = RunDir(path)
    config = rd.read_config()
    history = rd.read_history()
    watched = [rd.config, rd.history, rd.metrics, path / "curves.png", rd.last]
    updated = max(p.stat().st_mtime for p in watched if p.exists())
    if rd.finished():
        status, best = "finished", rd.read_metrics().get("best_val_accuracy")
    else:
        status = "training" if time.time() - updated < LIVE_SECONDS else "stopped"
        best = max((h["val_accuracy"] for h in history if isinstance(h.get("val_accuracy"), float)), default=None)
    return {
        "name": name,
        "kind": "run",
        "backbone": config.get("spec", {}).get("name", config.get("backbone")),
        "data": str(config.get("data", {}).get("root", config.get("data_dir", ""))),
        "classes": config.get("classes", []),
        "image_size": config.get("image_size"),
        "best_val_accuracy": best,
        "date": _stamp(rd.config.stat().st_mtime),
        "updated": updated,
        "status": status,
        "epoch": history[-1]["epoch"] if history else 0,
        "phase": history[-1]["phase"] if history else "starting",
        "epochs_total": int(config.get("epochs", 0)) + int(config.get("fine_tune_epochs", 0)),
        "curves_version": _version(path / "curves.png"),
        "exports": sorted(p.name for p in path.iterdir() if p.suffix in (".onnx", ".pt") and p.is_file()),
    }


def benchmark_summary(path: Path, name: str) -> dict:
    """One row of the runs page for a benchmark: its best model and how many it compared."""
    rows = json.loads((path / "leaderboard.json").read_text())
    done = [r for r in rows if r.get("val_accuracy_best") is not None]
    best = max(done, key=lambda r: r["val_accuracy_best"], default=None)
    updated = (path / "leaderboard.json").stat().st_mtime
    return {
        "name": name,
        "kind": "benchmark",
        "backbone": f"{len(rows)} backbones, best: {best['model']}" if best else f"{len(rows)} backbones",
        "data": "",
        "best_val_accuracy": best["val_accuracy_best"] if best else None,
        "date": _stamp(updated),
        "updated": updated,
        "status": "finished" if len(done) == len(rows) else f"{len(done)} of {len(rows)} done",
        "rows": rows,
    }


def _version(path: Path) -> int:
    """A cache-busting number that changes whenever the file is rewritten."""
    return path.stat().st_mtime_ns if path.exists() else 0
