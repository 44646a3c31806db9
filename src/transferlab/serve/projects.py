"""The project page's datasets: named classes of images, made in the browser, kept as an ordinary folder.

A project is ``<runs folder>/projects/<project>/<class>/<image>``, the ``class/image`` tree that
``transferlab train`` and the Python API read as is. Everything here treats the request as hostile:
project and class names are one folder name each (letters, digits, spaces, ``-``, ``_``, ``.``; no
leading dot, no ``..``), each folder is opened without following a link (``catalog.open_under``),
an upload is stored under a name of our choosing with its detected format's extension, written to
a temporary file and linked into place so that it never replaces another image, and an image is
decoded whole, after its declared size in pixels passed the limit, before a byte of it is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path

from transferlab.serve.catalog import PROJECTS, BadName, NotFound, open_under

NAME = re.compile(r"^[^\W_][\w .-]{0,63}$")  # \w is Unicode: "Äpfel", "猫" and "red_car 2" are names
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
MAX_PIXELS = 40_000_000  # per image: a 40-megapixel photo; a decompression bomb declares far more
MAX_IMAGES = 5_000  # per project
MAX_CLASSES = 100
_lock = threading.Lock()  # one change at a time: a name checked free is still free when it is taken


class Refused(ValueError):
    """An upload or change the project page will not make (a 4xx, with ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str, what: str) -> str:
    """``name`` (NFC, stripped) when it is one safe folder name, else BadName saying what is allowed."""
    name = unicodedata.normalize("NFC", name.strip())
    if not NAME.match(name) or name.endswith((".", " ")) or ".." in name:
        raise BadName(
            f"bad {what} name {name[:80]!r}: use up to 64 letters, digits, spaces, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


class Projects:
    """The projects under one runs folder."""

    def __init__(self, root: Path, max_pixels: int = MAX_PIXELS, max_images: int = MAX_IMAGES) -> None:
        self.root, self.max_pixels, self.max_images = root, max_pixels, max_images

    def path(self, project: str) -> Path:
        return self.root / PROJECTS / check_name(project, "project")

    def _dir(self, *parts: str) -> int:
        """A descriptor of projects/parts (no link followed); NotFound naming what is missing."""
        try:
            return open_under(self.root, [PROJECTS, *parts], directory=True)
        except NotFound:
            raise NotFound(
                f"no {('project', 'class')[len(parts) - 1]} {'/'.join(parts)!r}: see /api/projects"
            ) from None

    def list(self) -> list[dict]:
        if not (self.root / PROJECTS).is_dir():
            return []
        names = sorted(e.name for e in os.scandir(self.root / PROJECTS) if e.is_dir(follow_symlinks=False))
        return [self.get(n) for n in names if NAME.match(n)]

    def get(self, project: str) -> dict:
        """The project's classes with their images (file names, in order), and the counts."""
        project = check_name(project, "project")
        with _closing(self._dir(project)) as fd:
            classes = {}
            for entry in sorted(os.listdir(fd)):
                if NAME.match(entry) and stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                    classes[entry] = self._images(project, entry)
        counts = {c: len(files) for c, files in classes.items()}
        return {"name": project, "classes": classes, "counts": counts, "images": sum(counts.values())}

    def _images(self, project: str, klass: str) -> list[str]:
        with _closing(self._dir(project, klass)) as fd:
            return sorted(
                f for f in os.listdir(fd)
                if f.endswith(tuple(FORMATS.values())) and not f.startswith(".")
                and stat.S_ISREG(os.stat(f, dir_fd=fd, follow_symlinks=False).st_mode)
            )  # fmt: skip

    def create(self, project: str, classes: list[str]) -> dict:
        project = check_name(project, "project")
        names = [check_name(c, "class") for c in classes]
        if len(set(n.casefold() for n in names)) < len(names):
            raise Refused(f"class names {names} repeat a name: give each class its own")
        with _lock:
            (self.root / PROJECTS).mkdir(parents=True, exist_ok=True)
            with _closing(open_under(self.root, [PROJECTS], directory=True)) as fd:
                if _taken(fd, project):
                    raise Refused(f"a project named {project!r} exists: open it or choose another name", 409)
                os.mkdir(project, dir_fd=fd)
        for name in names:
            self.add_class(project, name)
        return self.get(project)

    def add_class(self, project: str, klass: str) -> dict:
        klass = check_name(klass, "class")
        with _lock, _closing(self._dir(check_name(project, "project"))) as fd:
            if _taken(fd, klass):
                raise Refused(f"project {project!r} has a class {klass!r}: choose another name", 409)
            if sum(1 for e in os.listdir(fd) if NAME.match(e)) >= MAX_CLASSES:
                raise Refused(f"project {project!r} has {MAX_CLASSES} classes, the most a project may have", 409)
            os.mkdir(klass, dir_fd=fd)
        return self.get(project)

    def rename_class(self, project: str, klass: str, to: str) -> dict:
        klass, to = check_name(klass, "class"), check_name(to, "class")
        with _lock, _closing(self._dir(check_name(project, "project"))) as fd:
            os.close(self._dir(project, klass))  # it exists and is a folder, not a link
            if _taken(fd, to, besides=klass):
                raise Refused(f"project {project!r} has a class {to!r}: rename to a name not taken", 409)
            os.rename(klass, to, src_dir_fd=fd, dst_dir_fd=fd)
        return self.get(project)

    def delete_class(self, project: str, klass: str) -> dict:
        klass = check_name(klass, "class")
        with _lock, _closing(self._dir(check_name(project, "project"))) as fd:
            os.close(self._dir(project, klass))
            shutil.rmtree(klass, dir_fd=fd)  # removes links, never follows them
        return self.get(project)

    def delete_image(self, project: str, klass: str, file: str) -> dict:
        with _closing(self._dir(check_name(project, "project"), check_name(klass, "class"))) as fd:
            _image_name(file, project, klass)
            try:
                if not stat.S_ISREG(os.stat(file, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise BadName(f"{project}/{klass}/{file} is not an image file")
                os.unlink(file, dir_fd=fd)
            except FileNotFoundError:
                raise NotFound(f"no image {file!r} in {project}/{klass}") from None
        return self.get(project)

    def open_image(self, project: str, klass: str, file: str) -> int:
        """A descriptor of one stored image, for the page's thumbnails."""
        _image_name(file, project, klass)
        fd = open_under(self.root, [PROJECTS, check_name(project, "project"), check_name(klass, "class"), file], False)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"no image {file[:80]!r} in {project}/{klass}")
        return fd

    def add_images(self, project: str, klass: str, uploads: list[tuple[str, bytes]]) -> list[str]:
        """Check every upload, then store them all (or none): the names they are stored under."""
        project, klass = check_name(project, "project"), check_name(klass, "class")
        held = self.get(project)
        if klass not in held["classes"]:
            raise NotFound(f"no class {klass!r} in project {project!r}: add it first")
        if held["images"] + len(uploads) > self.max_images:
            raise Refused(
                f"project {project!r} holds {held['images']} images; {len(uploads)} more would pass the limit of "
                f"{self.max_images}: remove some or start another project", 413
            )  # fmt: skip
        checked = [(name, data, check_image(name, data, self.max_pixels)) for name, data in uploads]
        stored = []
        with _lock, _closing(self._dir(project, klass)) as fd:
            for name, data, ext in checked:
                stored.append(_store(fd, _stem(name), ext, data))
        return stored


def check_image(name: str, data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """The extension of an upload's format, once it decoded whole within the pixel limit; else Refused."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise Refused(
                        f"{name[:80]!r} is {width}x{height} pixels, over the limit of {max_pixels:,}: "
                        "upload a smaller picture", 413
                    )  # fmt: skip
                if im.format not in FORMATS:
                    raise Refused(f"{name[:80]!r} is {im.format}: upload JPEG, PNG, WebP, BMP or GIF pictures")
                im.load()
                return FORMATS[im.format]
    except Refused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refused(
            f"{name[:80]!r} declares over {max_pixels:,} pixels (a decompression bomb): upload an ordinary picture",
            413,
        ) from None
    except Exception as e:  # PIL raises many kinds for damaged files
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise Refused(f"{name[:80]!r} is not a readable image ({why}): upload a JPEG or PNG picture") from None


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    """A folder descriptor, closed when the block ends."""
    try:
        yield fd
    finally:
        os.close(fd)


def _image_name(file: str, project: str, klass: str) -> None:
    """Refuse a name this module could not have stored: a path, a hidden file, another extension."""
    if "/" in file or file.startswith(".") or not file.endswith(tuple(FORMATS.values())):
        raise NotFound(f"no image {file[:80]!r} in {project}/{klass}: use a name from /api/projects/{project}")


def _taken(fd: int, name: str, besides: str | None = None) -> bool:
    """Whether ``name`` is in the folder, as any kind of entry, letter case aside (a case-blind disk)."""
    return any(e.casefold() == name.casefold() and e != besides for e in os.listdir(fd))


def _stem(filename: str) -> str:
    """A safe file stem from an upload's name: its last part, letters, digits, '-' and '_' only."""
    stem = Path(filename.replace("\\", "/").split("/")[-1]).stem
    stem = re.sub(r"[^\w-]+", "_", unicodedata.normalize("NFC", stem)).strip("_")[:60]
    return stem or "image"


def _store(fd: int, stem: str, ext: str, data: bytes) -> str:
    """Write ``data`` as a new file in the folder ``fd``: a temporary file linked to the first free name."""
    temp = f".upload-{os.getpid()}-{threading.get_ident()}{ext}"
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
    try:
        with open(out, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for n in range(1, 100_000):
            name = f"{stem}{ext}" if n == 1 else f"{stem}-{n}{ext}"
            try:
                os.link(temp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)  # never replaces a file
                return name
            except FileExistsError:
                continue
        raise Refused(f"no free name for {stem}{ext}: rename the file", 409)
    finally:
        os.unlink(temp, dir_fd=fd)
