"""Labels from a CSV (data/labels.py): the same rows as a folder, on real shared images; bad rows are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import DATASETS, run_cli

from transferlab.data.index import index_folder
from transferlab.data.labels import index_data, index_table
from transferlab.errors import UserError

HYM = DATASETS / "hymenoptera"
TINY = ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "16"]


def images(split: str, label: str, n: int) -> list[Path]:
    return sorted((HYM / split / label).glob("*.jpg"))[:n]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def with_split(tmp_path: Path) -> Path:
    """hymenoptera's own train/val split as a CSV, paths relative to the CSV (through a link to the dataset)."""
    (tmp_path / "photos").symlink_to(HYM)
    rows = [
        [f"photos/{split}/{label}/{p.name}", label, "valid" if split == "val" else "train"]
        for split in ("train", "val")
        for label in ("ants", "bees")
        for p in images(split, label, 12 if split == "train" else 6)
    ]
    return write_csv(tmp_path / "labels.csv", ["image", "label", "split"], rows)


def test_a_csv_with_a_split_column_gives_the_rows_it_names(with_split: Path) -> None:
    index = index_table(with_split)
    assert index.classes == ["ants", "bees"] and index.layout == "csv"
    assert len(index.train) == 24 and len(index.val) == 12 and not index.skipped
    assert {s.path.parent.parent.name for s in index.train} == {"train"}
    assert {s.path.parent.parent.name for s in index.val} == {"val"}
    assert all(index.classes[s.label] == s.path.parent.name for s in index.train + index.val)


def test_a_csv_without_split_is_split_as_its_folder_would_be(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    rows = []
    for label in ("ants", "bees"):
        (folder / label).mkdir(parents=True)
        for p in images("train", label, 10):
            (folder / label / p.name).symlink_to(p)
            rows.append([str(folder / label / p.name), label])  # absolute paths
    table = index_data(write_csv(tmp_path / "all.csv", ["file", "class"], rows), val_split=0.2, seed=3)
    same = index_folder(folder, val_split=0.2, seed=3)
    assert [s.path for s in table.val] == [s.path for s in same.val]
    assert [s.path for s in table.train] == [s.path for s in same.train]


def test_fastais_is_valid_and_named_columns(tmp_path: Path) -> None:
    ants, bees = images("train", "ants", 3), images("train", "bees", 3)
    rows = [[str(p), "x", label, str(i == 0)] for label, ps in (("ant", ants), ("bee", bees)) for i, p in enumerate(ps)]
    path = write_csv(tmp_path / "t.csv", ["path", "junk", "tag", "is_valid"], rows)
    index = index_table(path, image_column="path", label_column="tag")
    assert index.classes == ["ant", "bee"] and len(index.val) == 2 and len(index.train) == 4
    with pytest.raises(UserError, match="has no column 'nope' \\(its columns: path, junk, tag, is_valid\\)"):
        index_table(path, label_column="nope")


def test_missing_and_unreadable_files_are_skipped_and_relative_mixes_with_absolute(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(images("train", "ants", 1)[0].read_bytes()[:500])
    rows = [[str(p), "ants"] for p in images("train", "ants", 4)]
    rows += [[f"../{tmp_path.name}/{p.name}", "bees"] for p in images("train", "bees", 4)]  # relative, via ..
    for p in images("train", "bees", 4):
        (tmp_path / p.name).symlink_to(p)
    rows += [["gone.jpg", "ants"], ["broken.jpg", "bees"]]
    index = index_table(write_csv(tmp_path / "mixed.csv", ["image", "label"], rows))
    assert len(index.train) + len(index.val) == 8
    assert {Path(p).name: why for p, why in index.skipped}.keys() == {"gone.jpg", "broken.jpg"}
    assert dict((Path(p).name, why) for p, why in index.skipped)["gone.jpg"] == "missing file"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["a.jpg", "ants", "train"], ["b.jpg", " ", "val"]], "row 3 of .* \\(b.jpg\\) has a blank label"),
        ([["a.jpg", "ants", "train"], ["b.jpg", "bees", "holdout"]], "row 3 of .*: split 'holdout' is not train"),
        ([["a.jpg", "ants", "train"], ["", "bees", "val"]], "row 3 of .* has no image path"),
    ],
)
def test_a_bad_row_is_one_line_naming_it(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(UserError, match=message):
        index_table(write_csv(tmp_path / "bad.csv", ["image", "label", "split"], rows))


@pytest.mark.slow
def test_train_evaluate_and_review_from_a_csv(with_split: Path, tmp_path: Path) -> None:
    with open(with_split, "a", newline="") as f:
        csv.writer(f).writerow(["photos/train/ants/missing.jpg", "ants", "train"])
    out = tmp_path / "run"
    trained = run_cli("train", with_split, "--out", out, *TINY)
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_train_images"] == 24 and metrics["num_val_images"] == 12 and metrics["skipped_files"] == 1
    assert "missing.jpg\tmissing file" in (out / "skipped_files.txt").read_text()
    evaluated = run_cli("evaluate", out, with_split, "--format", "json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["num_images"] == 12 and result["accuracy"] == metrics["eval_accuracy"]  # the same val rows
    reviewed = run_cli("review", out, "--count", "2")
    assert reviewed.returncode == 0 and "ants" in reviewed.stdout, reviewed.stderr
