"""Bad inputs built from real shared images (copies corrupted in a temporary folder)."""

import json
import shutil

import numpy as np
import pytest
from conftest import DATASETS, FAST, run_cli
from PIL import Image

from transferlab import TrainConfig, train
from transferlab.data.images import BadImage, load_rgb
from transferlab.data.index import check_image, index_folder
from transferlab.errors import UserError

HYM = DATASETS / "hymenoptera"
ANT = sorted((HYM / "train" / "ants").glob("*.jpg"))[0]
BEE = sorted((HYM / "train" / "bees").glob("*.jpg"))[0]


def _bad_files(folder):
    """Every kind of unreadable file, named like images; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    data = ANT.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(5000))
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 Mpx in a few KB
    return {"empty.jpg", "truncated.jpg", "page.jpg", "noise.png", "bomb.png"}


@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "page.jpg", "noise.png", "bomb.png"])
def test_each_bad_file_is_refused_with_a_reason(tmp_path, name):
    _bad_files(tmp_path)
    with pytest.raises(BadImage):
        load_rgb(tmp_path / name)
    assert check_image(tmp_path / name)


def test_image_modes_are_converted_and_exif_orientation_applied(tmp_path):
    src = Image.open(ANT).convert("RGB")
    w, h = src.size
    variants = {
        "gray.png": src.convert("L"),
        "rgba.png": src.convert("RGBA"),
        "palette.gif": src.convert("P"),
        "cmyk.jpg": src.convert("CMYK"),
        "sixteen.png": Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257),
    }
    for name, im in variants.items():
        im.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (w, h), name
        diff = np.abs(np.asarray(out.convert("L"), dtype=float) - np.asarray(src.convert("L"), dtype=float)).mean()
        assert diff < 12, (name, diff)  # same picture, not black or noise
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    src.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (h, w)


def test_training_skips_counts_and_lists_bad_files(tmp_path, small_data):
    data = tmp_path / "data"
    shutil.copytree(small_data, data, symlinks=True)
    bad = _bad_files(data / "train" / "ants")
    (data / "train" / "ants" / ".DS_Store").write_bytes(b"\0\1")
    (data / "train" / "ants" / "notes.txt").write_text("not an image, ignored quietly")
    out = tmp_path / "run"
    proc = run_cli("train", data, "--out", out, "--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "0",
                   "--workers", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning: 5 file(s) are not readable images and were skipped" in proc.stderr
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert {line.split("\t")[0].rsplit("/", 1)[1] for line in listed} == bad
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_files"] == 5 and metrics["num_train_images"] == 48


def _layout(tmp_path, spec: dict) -> str:
    for rel, n in spec.items():
        folder = tmp_path / rel
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{i}.jpg").symlink_to(ANT if i % 2 else BEE)
    return str(tmp_path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"a": 0, "b": 0}, "no readable images"),
        ({"only": 4}, "only one class ('only')"),
        ({"a": 3, "b": 0}, "class folder 'b'"),
        ({"train/a": 3, "train/b": 3, "val/a": 2, "val/c": 2}, "class 'c' is in"),
        ({"train/a": 3, "train/b": 3, "val/a": 2, "val/b": 2, "cats": 2}, "mixes split folders"),
        ({}, "no class folders"),
    ],
)
def test_bad_folders_end_with_one_clear_line(tmp_path, spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        index_folder(_layout(tmp_path, spec))


def test_cli_errors_are_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    proc = run_cli("train", tmp_path / "missing")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: data folder not found: {tmp_path / 'missing'}: pass a folder with one sub-folder per class"
    )
    proc = run_cli("--debug", "train", tmp_path / "missing")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake, message",
    [
        (["/no/such/folder"], "data folder not found"),
        (["{data}", "--lr", "-1"], "--lr -1.0: must be above 0"),
        (["{data}", "--backbone", "resnet50"], "no pretrained weights for backbone 'resnet50'"),
        (["{data}", "--backbone", "no_such_net"], "unknown backbone 'no_such_net'"),
        (["{data}", "--fine-tune-at", "99"], "--fine-tune-at '99' is outside"),
        (["{data}", "--image-size", "20"], "below efficientnet_lite0's minimum"),
        (["{data}", "--accelerator", "gpu"], "--accelerator gpu"),
    ],
)
def test_a_failing_start_with_overwrite_leaves_the_old_run_byte_for_byte(
    trained_run, small_data, tmp_path, empty_hf, mistake, message
):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = _files(copy)
    args = [a.replace("{data}", str(small_data)) for a in mistake]
    proc = run_cli("train", *args, "--out", copy, "--overwrite", env={**empty_hf, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the error, and at most one warning line before it
    assert _files(copy) == before


def test_unfinished_run_is_not_restarted_silently(small_data, tmp_path):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="holds an unfinished run"):
        train(TrainConfig(data_dir=str(small_data), out=str(out), **FAST))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "foreign", "pickle"])
def test_damaged_or_foreign_checkpoint_gives_one_line(trained_run, tmp_path, damage):
    import torch

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("cache"))
    best = copy / "checkpoints" / "best.ckpt"
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:5000])
    elif damage == "foreign":
        torch.save({"state_dict": {"net.head.1.weight": torch.zeros(3, 3)}}, best)
    else:
        torch.save({"state_dict": {}, "x": _Evil(str(tmp_path / "pwned"))}, best)
    proc = run_cli("predict", ANT, "--run", copy)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "checkpoint" in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_predict_on_a_mixed_folder_predicts_images_and_reports_the_rest(trained_run, tmp_path):
    run, _ = trained_run
    folder = tmp_path / "mixed"
    _bad_files(folder)
    Image.open(ANT).convert("L").resize((50, 90)).save(folder / "small_gray.png")  # other size and mode
    shutil.copyfile(BEE, folder / "bee.jpg")
    (folder / "readme.txt").write_text("ignored")
    proc = run_cli("predict", folder, "--run", run, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p["image"].rsplit("/", 1)[1] for p in json.loads(proc.stdout)) == ["bee.jpg", "small_gray.png"]
    assert "warning: 5 file(s) are not readable images and were skipped" in proc.stderr


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")],
)
def test_out_of_memory_on_a_batch_suggests_a_smaller_batch_size(small_data, tmp_path, monkeypatch, error):
    from transferlab.recipe.module import TransferModule

    def fail(self, batch, _):
        raise error

    monkeypatch.setattr(TransferModule, "training_step", fail)
    with pytest.raises(UserError, match=r"out of memory with --batch-size 16 .*smaller --batch-size \(e.g. 8\)"):
        train(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "r"), **FAST))
