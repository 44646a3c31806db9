"""The README's code blocks, run as written: its Python example and every ``sh`` block of commands.

They run in a temporary folder where ``photos/`` is a small real dataset (hymenoptera images) and ``tiles/`` one of
several labels per image (``benchmarks/multi_label.py --compose``).
The quick start (`make ...`) is what CI itself runs; ``bash`` blocks show what needs hardware this
machine lacks (GPUs, a cluster) and are not run.
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import DATASETS, ROOT, make_subset

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    photos = make_subset(folder / "photos", train=12, val=8)
    rows = [f"{p.relative_to(photos).as_posix()},{p.parent.name},{p.parent.parent.name}" for p in photos.glob("*/*/*")]
    (photos / "labels.csv").write_text("image,label,split\n" + "\n".join(sorted(rows)) + "\n")
    others = folder / "others"  # photos of none of the classes, for `evaluate --unknown`
    others.mkdir()
    for cat in sorted((DATASETS / "cats_and_dogs_filtered" / "validation" / "cats").glob("*.jpg"))[:6]:
        shutil.copy(cat, others / cat.name)
    # tiles/: several labels per image, composed as the README says
    compose = [sys.executable, str(ROOT / "benchmarks" / "multi_label.py"), "--compose", str(folder / "tiles")]
    subprocess.run(compose + ["--train", "40", "--val", "20", "--tile", "32"], check=True, capture_output=True)
    return folder


def test_the_readme_has_the_blocks_this_test_runs():
    commands = [line for b in blocks("sh") for line in b.splitlines() if line.startswith("transferlab ")]
    assert len(commands) >= 8 and len(blocks("python")) == 2  # the API's example, then the export's
    assert {"make demo", "make test"} <= {line.split("#")[0].strip() for b in blocks("sh") for line in b.splitlines()}


def test_every_command_runs_as_written(photos_dir, empty_hf):
    env = {**os.environ, **empty_hf, "HF_HUB_OFFLINE": "1"}
    for block in blocks("sh"):
        for line in block.splitlines():
            if not line.startswith("transferlab "):
                continue
            args = shlex.split(line)[1:]
            proc = subprocess.run([sys.executable, "-m", "transferlab", *args], cwd=photos_dir, env=env,
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            assert proc.returncode == 0, f"{line}\n{proc.stderr}"
            assert proc.stdout.strip(), line
    assert (photos_dir / "runs" / "photos" / "metrics.json").is_file()
    assert (photos_dir / "runs" / "photos" / "model.onnx").is_file()
    assert (photos_dir / "runs" / "bench" / "leaderboard.csv").is_file()
    unknown = json.loads((photos_dir / "runs" / "photos" / "evaluation.json").read_text())["unknown"]
    assert unknown["images"] == 6 and unknown["score"] == "similarity to the training images"
    assert "best_val_map" in json.loads((photos_dir / "runs" / "tiles" / "metrics.json").read_text())
    # the exports' example, on the ONNX file the commands wrote, with onnxruntime alone
    for name in ("model.tflite", "hf/config.json", "hf/model.safetensors"):
        assert (photos_dir / "runs" / "photos" / name).is_file(), name
    proc = subprocess.run([sys.executable, "-c", blocks("python")[1]], cwd=photos_dir, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] in ("ants", "bees")


def test_the_python_example_runs_as_written(photos_dir, empty_hf):
    env = {**os.environ, **empty_hf, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", blocks("python")[0]], cwd=photos_dir, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    accuracy, prediction = proc.stdout.strip().splitlines()[-2:]
    results = ast.literal_eval(prediction)
    assert 0.5 <= float(accuracy) <= 1 and len(results) == 8  # every bee photo of photos/val
    assert all(r["image"].startswith("photos/val/bees/") and r["top"][0]["label"] in ("ants", "bees") for r in results)
