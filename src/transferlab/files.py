"""Finding image files, and writing the tool's text and run files (no heavy imports here)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: every file a run writes gets this one mode
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
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would differ from the files written by other libraries
    finally:
        os.close(fd)
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


def user_key(create: bool = True) -> bytes | None:
    """This user's secret for signing the runs they train (``$XDG_CONFIG_HOME/transferlab/key``, mode 0600).

    None when it cannot be read or made (a read-only home): then no run counts as this user's own.
    """
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "transferlab"
    path = home / "key"
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=".key.")  # 0600, written whole before it gets its name
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32).hex().encode())
            os.link(tmp, path)  # fails if another process made it first: then theirs is read
        finally:
            os.unlink(tmp)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        return _read_key(path)
    except OSError:
        return None


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        key = f.read(128).strip()
    if len(key) < 32:
        raise OSError(f"{path} is too short to be a key")
    return key


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
