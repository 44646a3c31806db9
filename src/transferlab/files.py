"""Finding image files, and writing the tool's text and run files (no heavy imports here)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def is_image_name(path: Path) -> bool:
    """An image by its extension, not hidden: everything else in a folder is ignored quietly."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def expand_images(paths: list[Path]) -> list[Path]:
    """Image files from files and folders (recursively), in a stable order."""
    from transferlab.errors import UserError

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_image_name(f)))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such image or folder: {p}: check the path")
    if not files:
        raise UserError(f"no images found in {', '.join(map(str, paths))}: pass image files or folders of them")
    return files


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write via a temporary file in the same folder and rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
