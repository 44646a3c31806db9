"""Shared paths and helpers: tests read the real datasets in ../shared in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
SANITY = SHARED / "images" / "imagenet_sanity"

os.environ.setdefault("MPLBACKEND", "Agg")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m transferlab ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "transferlab", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def kill_mid_run(args: list, history: Path, epochs: int = 2) -> None:
    """Start `transferlab ARGS`; once ``history`` has ``epochs`` epochs' rows (the closed-form head's epoch 0 aside),
    SIGKILL every process of it mid-epoch."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "transferlab", *map(str, args)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (
            history.is_file()
            and sum(not r.startswith(("epoch,", "0,")) for r in history.read_text().splitlines()) >= epochs
        ):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a scheduler's kill would
    proc.wait()


def kill_and_resume(data: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    """A 3 + 3 epoch run on the plain path, SIGKILLed after two epochs and resumed: its history rows and metrics."""
    import csv
    import json

    args = ["train", data, "--out", out, "--image-size", "64", "--epochs", "3", "--fine-tune-epochs", "3",
            "--cache", "none", "--workers", "0", "--batch-size", "8", *extra]  # fmt: skip
    kill_mid_run(args, out / "history.csv")
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    assert "process " in (out.parent / f".{out.name}.lock").read_text()  # the dead holder's lock, taken over below
    resumed = run_cli("train", "--resume", out, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # epoch 0: the closed-form head, kept
    assert [r["phase"] for r in rows] == ["head"] + ["feature_extraction"] * 3 + ["fine_tune"] * 3
    return rows, json.loads((out / "metrics.json").read_text())


@pytest.fixture
def empty_hf(tmp_path: Path) -> dict:
    """Environment with an empty Hugging Face cache, so only bundled weights are on the machine."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}


def make_subset(dest: Path, source: Path = DATASETS / "hymenoptera", train: int = 16, val: int = 10) -> Path:
    """A small split-folder dataset of symlinks to real shared images (first files by name per class)."""
    splits = {"train": train, "val": val}
    for split, n in splits.items():
        src_split = next(source / name for name in (split, "validation", "test") if (source / name).is_dir())
        for class_dir in sorted(p for p in src_split.iterdir() if p.is_dir()):
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            for img in images[:n]:
                (out / img.name).symlink_to(img)
    return dest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("hym"), train=24, val=16)


# float32 extraction: the cached validation pass and the final evaluation then compute the same numbers,
# which tests compare exactly (bf16 extraction has its own tests in test_cache.py)
FAST = dict(
    image_size=96, batch_size=16, epochs=2, fine_tune_epochs=1, workers=0, cache_views=2, extract_precision="32"
)


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory) -> tuple[Path, dict]:
    """One small real run (cached path), shared by the tests that only read a finished run."""
    from transferlab import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run"
    metrics = train(TrainConfig(data_dir=str(small_data), out=str(out), **FAST))
    return out, metrics
