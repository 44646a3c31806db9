"""Every source of labels as the same rows: a folder of class folders (data.index), or a CSV of images and labels.

The image and label columns are the first two unless named; paths are relative to the CSV's folder, or
absolute. A ``split`` column (train / val / test) or fastai's boolean ``is_valid`` says which rows hold out;
without one, the seeded stratified split of a folder applies. Missing and unreadable files are skipped,
counted and listed as a folder's are; a blank label, an unknown split or a missing column is one line that
names the row.
"""

from __future__ import annotations

import csv
from pathlib import Path

from transferlab.data.index import DataIndex, Sample, check_counts, check_image, index_folder, stratified_split
from transferlab.errors import UserError

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}
TRUTH = {"true": "val", "1": "val", "yes": "val", "false": "train", "0": "train", "no": "train"}
MAX_BYTES = 256 * 2**20  # a labels table larger than this is refused before it is read


def is_table(source: str | Path) -> bool:
    return Path(source).suffix.lower() == ".csv"


def source_name(source: str | Path) -> str:
    """What a run or benchmark of this data is called by default: the folder's name, or the CSV's without .csv."""
    path = Path(source).resolve()
    return path.stem if is_table(path) else path.name


def index_data(
    source: str | Path, val_split: float = 0.2, seed: int = 0, image_column: str | None = None,
    label_column: str | None = None,
) -> DataIndex:  # fmt: skip
    """A dataset's rows, whatever holds its labels: everything downstream reads the DataIndex, never the source."""
    if is_table(source):
        return index_table(source, val_split, seed, image_column, label_column)
    return index_folder(source, val_split, seed)


def held_out(
    source: str | Path, classes: list[str], image_column: str | None = None, label_column: str | None = None
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The images to evaluate on in a CSV (its val/test rows, else every row), labelled by ``classes``."""
    path = Path(source)
    rows = read_rows(path, image_column, label_column)
    unknown = sorted({label for _, _, label, _ in rows} - set(classes))
    if unknown:
        raise UserError(f"label '{unknown[0]}' in {path} is not one the run was trained on ({', '.join(classes)})")
    if any(split == "val" for *_, split in rows):
        rows = [r for r in rows if r[3] == "val"]
    kept, skipped = _checked(rows, classes)
    samples = [s for s, _ in kept]
    if not samples:
        raise UserError(f"no readable images among the rows of {path}: check the paths it names")
    return samples, skipped


def read_rows(path: Path, image_column: str | None, label_column: str | None) -> list[tuple[int, Path, str, str]]:
    """(row number, image path, label, split or "") for every row, or one UserError line."""
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
        if not label:
            raise UserError(f"row {number} of {path} ({image}) has a blank label: give its class, or remove the row")
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
        out.append((number, file if file.is_absolute() else path.parent / file, label, split))
    if not out:
        raise UserError(f"{path} has no rows: add one row per image (path, label)")
    return out


def _checked(rows: list, classes: list[str]) -> tuple[list[tuple[Sample, str]], list[tuple[str, str]]]:
    """The rows whose image reads, as samples with their split; the others as (path, why), as a folder's."""
    kept, skipped = [], []
    for _, file, label, split in rows:
        why = "missing file" if not file.is_file() else check_image(file)
        if why:
            skipped.append((str(file), why))
        else:
            kept.append((Sample(file, classes.index(label)), split))
    return kept, skipped


def _column(path: Path, header: list[str], name: str | None, default: int, flag: str) -> int:
    if name is None:
        return default
    if name not in header:
        raise UserError(f"{path} has no column {name!r} (its columns: {', '.join(header)}): pass another {flag}")
    return header.index(name)


def index_table(
    path: str | Path, val_split: float = 0.2, seed: int = 0, image_column: str | None = None,
    label_column: str | None = None,
) -> DataIndex:  # fmt: skip
    """The rows of a labels CSV as a DataIndex, every image checked (see the module docstring)."""
    path = Path(path)
    rows = read_rows(path, image_column, label_column)
    classes = sorted({label for _, _, label, _ in rows})
    if len(classes) < 2:
        raise UserError(f"only one class ('{classes[0]}') in {path}: a classifier needs at least two labels")
    kept, skipped = _checked(rows, classes)
    if any(split for _, split in kept):
        train = [s for s, split in kept if split == "train"]
        val = [s for s, split in kept if split == "val"]
    else:
        train, val = stratified_split([s for s, _ in kept], val_split, seed)
    index = DataIndex(path, classes, train, val, "csv", skipped)
    check_counts(index)
    return index
