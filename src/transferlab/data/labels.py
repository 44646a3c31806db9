"""Every source of labels as the same rows: a folder of class folders (data.index), or a CSV of images and labels.

The image and label columns are the first two unless named; paths are relative to the CSV's folder, or
absolute. A ``split`` column (train / val / test) or fastai's boolean ``is_valid`` says which rows hold out;
without one, the seeded stratified split of a folder applies. Missing and unreadable files are skipped,
counted and listed as a folder's are; a blank label, an unknown split or a missing column is one line that
names the row.

With ``multi_label``, a label cell holds several labels split by ``delim`` (a space by default), or none: an
image of none of the classes, which is valid. A share of the training rows is then kept out of training, for
each class's decision threshold (``THRESHOLD_SHARE``).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from transferlab.data.index import DataIndex, Sample, check_counts, check_image, index_folder, stratified_split
from transferlab.errors import UserError

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}
TRUTH = {"true": "val", "1": "val", "yes": "val", "false": "train", "0": "train", "no": "train"}
MAX_BYTES = 256 * 2**20  # a labels table larger than this is refused before it is read
THRESHOLD_SHARE = 0.15  # with several labels per image: training images kept out, to choose the thresholds on


def is_table(source: str | Path) -> bool:
    return Path(source).suffix.lower() == ".csv"


def source_name(source: str | Path) -> str:
    """What a run or benchmark of this data is called by default: the folder's name, or the CSV's without .csv."""
    path = Path(source).resolve()
    return path.stem if is_table(path) else path.name


def table_options(config: dict) -> dict:
    """How a run read its labels table (its config's columns and label mode), to read the same table again."""
    keys = ("image_column", "label_column", "multi_label", "label_delim")
    return {k: config[k] for k in keys if config.get(k) is not None}


def index_data(
    source: str | Path, val_split: float = 0.2, seed: int = 0, image_column: str | None = None,
    label_column: str | None = None, multi_label: bool = False, label_delim: str = " ",
) -> DataIndex:  # fmt: skip
    """A dataset's rows, whatever holds its labels: everything downstream reads the DataIndex, never the source."""
    if is_table(source):
        return index_table(source, val_split, seed, image_column, label_column, multi_label, label_delim)
    if multi_label:
        raise UserError(
            f"--multi-label reads several labels per image from a CSV, and {source} is a folder: pass a CSV of "
            "image,labels rows (labels split by --label-delim)"
        )
    return index_folder(source, val_split, seed)


def held_out(
    source: str | Path, classes: list[str], image_column: str | None = None, label_column: str | None = None,
    multi_label: bool = False, label_delim: str = " ",
) -> tuple[list[Sample], list[tuple[str, str]]]:  # fmt: skip
    """The images to evaluate on in a CSV (its val/test rows, else every row), labelled by ``classes``."""
    path = Path(source)
    rows = read_rows(path, image_column, label_column, multi_label, label_delim)
    unknown = sorted({label for _, _, labels, _ in rows for label in labels} - set(classes))
    if unknown:
        raise UserError(f"label '{unknown[0]}' in {path} is not one the run was trained on ({', '.join(classes)})")
    if any(split == "val" for *_, split in rows):
        rows = [r for r in rows if r[3] == "val"]
    kept, skipped = _checked(rows, classes, multi_label)
    samples = [s for s, _ in kept]
    if not samples:
        raise UserError(f"no readable images among the rows of {path}: check the paths it names")
    return samples, skipped


def read_rows(
    path: Path, image_column: str | None, label_column: str | None, multi_label: bool = False, delim: str = " "
) -> list[tuple[int, Path, tuple[str, ...], str]]:
    """(row number, image path, labels, split or "") for every row, or one UserError line; one label per row
    unless ``multi_label`` (then as many as the cell holds, split by ``delim``, none included)."""
    if not path.is_file():
        raise UserError(f"labels file not found: {path}: pass a CSV of image,label rows")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path} is over {MAX_BYTES // 2**20} MiB: split it, or use a folder of class folders")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as CSV ({e}): save it as UTF-8 comma-separated text") from None
    if len(header) < 2:
        raise UserError(f"{path} has {len(header)} column(s): give a header row and at least image and label columns")
    image_at = _column(path, header, image_column, 0, "--image-column")
    label_at = _column(path, header, label_column, 1, "--label-column")
    split_at = next((header.index(n) for n in ("split", "is_valid") if n in header), None)
    out = []
    for number, row in enumerate(rows, start=2):  # the header is line 1
        if not any(cell.strip() for cell in row):
            continue
        cells = row + [""] * (len(header) - len(row))
        image, label = cells[image_at].strip(), cells[label_at].strip()
        if not image:
            raise UserError(f"row {number} of {path} has no image path: give one, or remove the row")
        if not label and not multi_label:
            raise UserError(
                f"row {number} of {path} ({image}) has a blank label: give its class, or remove the row "
                "(with --multi-label, a blank cell is an image of none of the classes)"
            )
        labels = (
            tuple(dict.fromkeys(x.strip() for x in label.split(delim or None) if x.strip()))
            if multi_label
            else (label,)
        )
        split = ""
        if split_at is not None:
            value = cells[split_at].strip().lower()
            split = (SPLITS if header[split_at] == "split" else TRUTH).get(value, "?")
            if split == "?":
                allowed = "train, val or test" if header[split_at] == "split" else "true or false"
                raise UserError(
                    f"row {number} of {path}: {header[split_at]} {value!r} is not {allowed}: fix it, or drop the column"
                )
        file = Path(image)
        out.append((number, file if file.is_absolute() else path.parent / file, labels, split))
    if not out:
        raise UserError(f"{path} has no rows: add one row per image (path, label)")
    return out


def _checked(
    rows: list, classes: list[str], multi_label: bool = False
) -> tuple[list[tuple[Sample, str]], list[tuple[str, str]]]:
    """The rows whose image reads, as samples with their split; the others as (path, why), as a folder's."""
    kept, skipped = [], []
    for _, file, labels, split in rows:
        why = "missing file" if not file.is_file() else check_image(file)
        if why:
            skipped.append((str(file), why))
            continue
        indices = tuple(sorted(classes.index(label) for label in labels))
        kept.append((Sample(file, indices if multi_label else indices[0]), split))
    return kept, skipped


def _threshold_images(train: list[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """``THRESHOLD_SHARE`` of the training images kept out of training (stratified by their first label), but none
    that would leave one of its labels with no training image: a rare label trains, without a threshold of its own."""
    kept, tune = stratified_split(train, THRESHOLD_SHARE, seed)
    counts = Counter(c for s in kept for c in s.label)
    for s in list(tune):
        if any(counts[c] == 0 for c in s.label):
            tune.remove(s)
            kept.append(s)
            counts.update(s.label)
    return kept, tune


def _column(path: Path, header: list[str], name: str | None, default: int, flag: str) -> int:
    if name is None:
        return default
    if name not in header:
        raise UserError(f"{path} has no column {name!r} (its columns: {', '.join(header)}): pass another {flag}")
    return header.index(name)


def index_table(
    path: str | Path, val_split: float = 0.2, seed: int = 0, image_column: str | None = None,
    label_column: str | None = None, multi_label: bool = False, label_delim: str = " ",
) -> DataIndex:  # fmt: skip
    """The rows of a labels CSV as a DataIndex, every image checked (see the module docstring)."""
    path = Path(path)
    rows = read_rows(path, image_column, label_column, multi_label, label_delim)
    classes = sorted({label for _, _, labels, _ in rows for label in labels})
    if len(classes) < 2 and not (multi_label and classes):
        found = f"only one class ('{classes[0]}')" if classes else "no labels"
        raise UserError(f"{found} in {path}: a classifier needs at least two labels")
    kept, skipped = _checked(rows, classes, multi_label)
    if any(split for _, split in kept):
        train = [s for s, split in kept if split == "train"]
        val = [s for s, split in kept if split == "val"]
    else:
        train, val = stratified_split([s for s, _ in kept], val_split, seed)
    tune = []
    if multi_label and len(train) >= 2:
        train, tune = _threshold_images(train, seed)
    index = DataIndex(path, classes, train, val, "csv", skipped, multi_label, tune)
    check_counts(index)
    return index
