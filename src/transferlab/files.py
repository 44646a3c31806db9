"""Finding image files, and writing the tool's text and run files (no heavy imports here)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error.

    A kill at any moment leaves either the old file or the new one, never half of one. ``durable``
    also syncs the data to disk first (off for cache entries, which are checked when read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit(tmp, path, durable)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(tmp: Path, path: Path, durable: bool = True) -> None:
    """Rename a fully written ``tmp`` over ``path`` (after syncing it to disk when ``durable``)."""
    if durable:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write(path: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
