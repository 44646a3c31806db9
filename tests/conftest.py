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


@pytest.fixture
def empty_hf(tmp_path: Path) -> dict:
    """Environment with an empty Hugging Face cache, so only bundled weights are on the machine."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
