"""What a runs folder holds, and the one place the web app reads it from.

A name is a path under the runs folder (``photos`` or ``benchmark-photos/efficientnet_lite0``);
one with ``..``, an absolute path, a backslash or over the file system's length limits is refused
before any file is touched. Every file the app reads (pages, API, plots, the checkpoint a
prediction or review loads) is first checked by ``Folder``: each folder from the runs folder down
is opened with ``O_NOFOLLOW`` relative to the one above, and each file must be a regular file
opened the same way, so a run received from someone else cannot hand out ``/etc/shadow`` as its
curves.png, nor be a link to a folder elsewhere. A run with such a link, a file the server cannot
read or one that does not parse is *damaged*: listed with a one-line reason while the others are
served, its own pages a 409.

A run without metrics.json is "training" while its files changed in the last ``LIVE_SECONDS`` (a run
writes history.csv and last.ckpt every epoch, curves.png every 15 s at most), else "stopped" (resume it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml

from transferlab.errors import UserError
from transferlab.rundir.folder import EXPORTS, PLOTS, RECORDS, _num

LIVE_SECONDS = 600
SKIP = {"cache", "checkpoints", "lightning_logs"}
PROJECTS = "projects"  # the project page's datasets, under the runs folder (serve/projects.py)
MAX_DEPTH = 3
MAX_READ = 64 * 2**20  # the largest file a page or plot reads (checkpoints are loaded by path, after the check)
NAME_MAX, PATH_MAX = 255, 4000  # bytes per folder name and in all, under Linux's limits
FILES = {*PLOTS, "comparison.png"}  # a run's plots and a benchmark's
TEXT = {*RECORDS, "leaderboard.json"}
MODELS = EXPORTS  # that predict may load


class BadName(ValueError):
    """A run name that could leave the runs folder."""


class NotFound(LookupError):
    """No run or benchmark of that name."""


class Damaged(UserError):
    """A run or benchmark the app will not serve: a symbolic link, an unreadable file or one that does not parse."""


def short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def resolve(root: Path, name: str) -> Path:
    """The folder ``name`` names under ``root``; BadName for a name that could point outside it."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise BadName(f"bad run name {short(name)}: use a name from /api/runs (a path inside the runs folder, no '..')")
    if len(name.encode()) > PATH_MAX or any(len(p.encode()) > NAME_MAX for p in parts):
        raise BadName(f"bad run name {short(name)}: too long for a folder name; use a name from /api/runs")
    return root / name


def served(file: str) -> bool:
    """Whether the app may read ``file`` of a run or benchmark folder (so it must not be a link)."""
    return file in FILES or file in TEXT or file.endswith(MODELS) or file == "checkpoints"


def _why(error: OSError) -> str:
    return "permission denied" if isinstance(error, PermissionError) else (error.strerror or type(error).__name__)


class Folder:
    """One folder under the runs folder, reached without following links; what it holds, read the same way."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name, self.path = root, name, resolve(root, name)
        self.entries = self._list(name.split("/"))
        self.checkpoints: dict[str, os.stat_result] = {}
        self.kind = (
            "run" if "config.yaml" in self.entries else "benchmark" if "leaderboard.json" in self.entries else None
        )
        if self.kind is not None:
            self._no_links(self.entries, "", served)
        if self.kind == "run" and "checkpoints" in self.entries and stat.S_ISDIR(self.entries["checkpoints"].st_mode):
            self.checkpoints = self._list([*name.split("/"), "checkpoints"])
            self._no_links(self.checkpoints, "checkpoints/", lambda f: True)

    def expect(self, kind: str) -> Folder:
        if self.kind != kind:
            raise NotFound(f"no {kind} named {short(self.name)} in {self.root}: see /api/runs")
        return self

    def regular(self, file: str) -> bool:
        return file in self.entries and stat.S_ISREG(self.entries[file].st_mode)

    def mtime(self, file: str) -> float:
        return self.entries[file].st_mtime if file in self.entries else 0.0

    def read(self, file: str, limit: int = MAX_READ) -> bytes:
        """The bytes of a regular file of this folder; NotFound when absent, Damaged when not servable."""
        where = f"{self.name}/{file}"
        fd = self._open([*self.name.split("/"), *file.split("/")], directory=False)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Damaged(f"{where} is not a regular file: serve reads only plain files inside the runs folder")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise Damaged(f"{where} cannot be read ({_why(e)}): serve it as a user who can read it") from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise Damaged(f"{where} is over {limit // 2**20} MiB: not a file transferlab wrote")
        return data

    def text(self, file: str) -> str:
        try:
            return self.read(file).decode()
        except UnicodeDecodeError:
            raise Damaged(f"{self.name}/{file} is not UTF-8 text: the run directory is damaged") from None

    def data(self, file: str, kind: type) -> dict | list:
        """A YAML or JSON file that must hold a mapping (``dict``) or a list."""
        text = self.text(file)
        try:
            value = yaml.safe_load(text) if file.endswith(".yaml") else json.loads(text)
        except (yaml.YAMLError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise Damaged(f"{self.name}/{file} does not parse ({why}): the run directory is damaged") from None
        if not isinstance(value, kind):
            what = "empty" if value is None else f"a {type(value).__name__}"
            raise Damaged(f"{self.name}/{file} is {what}, not a {kind.__name__}: the run directory is damaged")
        return value

    def history(self) -> list[dict]:
        if not self.regular("history.csv"):
            return []
        rows = []
        for line, row in enumerate(csv.DictReader(io.StringIO(self.text("history.csv"))), start=2):
            if None in row or None in row.values():
                raise Damaged(f"{self.name}/history.csv line {line} is truncated: the run directory is damaged")
            rows.append({k: _num(v) for k, v in row.items()})
        return rows

    def _list(self, parts: list[str]) -> dict[str, os.stat_result]:
        """A folder's entries and their own modes (a link as a link)."""
        fd = self._open(parts, directory=True)
        try:
            with os.scandir(fd) as listing:
                return {e.name: e.stat(follow_symlinks=False) for e in listing}
        except OSError as e:
            where = "/".join(parts)
            raise Damaged(f"{where} cannot be read ({_why(e)}): serve it as a user who can read it") from None
        finally:
            os.close(fd)

    def _open(self, parts: list[str], directory: bool) -> int:
        return open_under(self.root, parts, directory)

    def _no_links(self, entries: dict[str, os.stat_result], prefix: str, checked: Callable[[str], bool]) -> None:
        for file, st in sorted(entries.items()):
            if stat.S_ISLNK(st.st_mode) and checked(file):
                where = f"{self.name}/{prefix}{file}"
                raise Damaged(f"{where} is a symbolic link: serve shows only files inside the runs folder; copy it in")


def open_under(root: Path, parts: list[str], directory: bool) -> int:
    """A descriptor of root/parts, each step opened relative to the last without following a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            kind = os.O_DIRECTORY if directory or not last else os.O_NONBLOCK  # a FIFO must not hang a read
            try:
                step = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | kind, dir_fd=fd)
            except OSError as e:
                raise _refusal(fd, part, "/".join(parts[: i + 1]), e) from None
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(fd: int, part: str, where: str, error: OSError) -> Exception:
    try:
        mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        return Damaged(f"{where} is a symbolic link: serve shows only files inside the runs folder; copy it in")
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return NotFound(f"{where} not found: see /api/runs")
    return Damaged(f"{where} cannot be read ({_why(error)}): serve it as a user who can read it")


def folder(root: Path, name: str) -> Folder:
    """``Folder(root, name)``, a missing one as NotFound."""
    try:
        return Folder(root, name)
    except NotFound:
        raise NotFound(f"no run or benchmark named {short(name)} in {root}: see /api/runs") from None


def discover(root: Path) -> list[dict]:
    """Every run and benchmark under ``root`` (benchmarks' own runs included), newest first; damaged ones as such."""
    found, unreadable = [], []
    for where, dirs, _ in os.walk(root, onerror=unreadable.append):
        path = Path(where)
        depth = len(path.relative_to(root).parts)
        dirs[:] = sorted(d for d in set(dirs) - SKIP if not d.startswith(".")) if depth < MAX_DEPTH else []
        links = [d for d in dirs if (path / d).is_symlink()]
        for d in links:  # a link to runs elsewhere: listed, with why it is not served
            found.append(damaged((path / d).relative_to(root).as_posix(), path / d, "run"))
        dirs[:] = [d for d in dirs if d not in links]
        if path == root:
            dirs[:] = [d for d in dirs if d != PROJECTS]  # datasets made on the project page, not runs
            continue
        name = path.relative_to(root).as_posix()
        try:
            entry = folder(root, name)
        except NotFound:  # gone since the walk listed it
            continue
        except Damaged as e:
            found.append(damaged(name, path, "run", str(e)))
            dirs[:] = []
            continue
        if entry.kind is None:
            continue
        try:
            found.append(run_summary(entry) if entry.kind == "run" else benchmark_summary(entry))
        except Damaged as e:
            found.append(damaged(name, path, entry.kind, str(e)))
        if entry.kind == "run":
            dirs[:] = []
    for error in unreadable:
        if error.filename and Path(error.filename) != root:
            name = Path(error.filename).relative_to(root).as_posix()
            found.append(damaged(name, Path(error.filename), "run", f"{name} cannot be read ({_why(error)})"))
    return sorted(found, key=lambda e: e["updated"], reverse=True)


def damaged(name: str, path: Path, kind: str, reason: str | None = None) -> dict:
    """The runs page's row for a run or benchmark it will not serve, with why."""
    if reason is None:
        reason = f"{name} is a symbolic link: serve shows only files inside the runs folder; copy it in"
    updated = path.lstat().st_mtime if os.path.lexists(path) else 0.0
    return {
        "name": name, "kind": kind, "backbone": "", "data": "", "best_val_accuracy": None, "date": _stamp(updated),
        "updated": updated, "status": "damaged", "reason": reason.splitlines()[0],
    }  # fmt: skip


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _number(value, where: str) -> float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise Damaged(f"{where} is {value!r}, not a number: the run directory is damaged")


def run(root: Path, name: str) -> tuple[Folder, dict]:
    """A run's checked folder and its summary: every route reads a run through this."""
    checked = folder(root, name).expect("run")
    return checked, run_summary(checked)


def run_summary(run: Folder) -> dict:
    """One row of the runs page: backbone, data, best accuracy, date, status and progress."""
    config = run.data("config.yaml", dict)
    history = run.history()
    spec, data = config.get("spec") or {}, config.get("data") or {}
    classes = config.get("classes") or []
    if not (isinstance(spec, dict) and isinstance(data, dict) and isinstance(classes, list)):
        raise Damaged(f"{run.name}/config.yaml is not a run's settings (spec, data, classes): the run is damaged")
    evaluation(run)  # checked here too, so that a bad one is listed as damaged
    last = run.checkpoints.get("last.ckpt")
    updated = max([run.mtime(f) for f in ("config.yaml", "history.csv", "metrics.json", "curves.png")])
    updated = max(updated, last.st_mtime if last else 0.0)
    if run.regular("metrics.json"):
        status = "finished"
        best = _number(run.data("metrics.json", dict).get("best_val_accuracy"), f"{run.name}/metrics.json's best")
    else:
        status = "training" if time.time() - updated < LIVE_SECONDS else "stopped"
        if (
            run.regular("stopped.json") and run.mtime("stopped.json") >= updated
        ):  # the web app stopped it, or it crashed
            status = "cancelled" if run.data("stopped.json", dict).get("status") == "cancelled" else "failed"
        best = max((h["val_accuracy"] for h in history if isinstance(h.get("val_accuracy"), float)), default=None)
    try:
        epochs = int(config.get("epochs") or 0) + int(config.get("fine_tune_epochs") or 0)
        image_size = _number(config.get("image_size"), "image_size")
    except (TypeError, ValueError, Damaged):
        raise Damaged(f"{run.name}/config.yaml has no whole numbers of epochs and pixels: the run is damaged") from None
    return {
        "name": run.name,
        "kind": "run",
        "backbone": str(spec.get("name", config.get("backbone", ""))),
        "data": str(data.get("root", config.get("data_dir", ""))),
        "classes": [str(c) for c in classes],
        "image_size": image_size,
        "best_val_accuracy": best,
        "date": _stamp(run.mtime("config.yaml")),
        "updated": updated,
        "status": status,
        "epoch": history[-1]["epoch"] if history else 0,
        # epoch 0 is the closed-form head, fitted before the first epoch
        "phase": {"head": "closed-form head"}.get(str(history[-1]["phase"]), str(history[-1]["phase"]))
        if history
        else "starting",
        "epochs_total": epochs,
        "curves_version": run.entries["curves.png"].st_mtime_ns if run.regular("curves.png") else 0,
        "exports": sorted(f for f in run.entries if f.endswith((".onnx", ".pt", ".tflite")) and run.regular(f)),
        "plots": sorted(f for f in FILES if run.regular(f)),
    }


def evaluation(run: Folder) -> dict:
    """evaluation.json as the run page shows it ({} when there is none); Damaged when it is not an evaluation."""
    if not run.regular("evaluation.json"):
        return {}
    value = run.data("evaluation.json", dict)
    per_class = value.get("per_class", {})
    several = value.get("multi_label") is True  # what the page then shows besides: AP and threshold, mean AP, F1
    fields = ("precision", "recall", "f1", "support") + ("threshold",) * several
    figures = ("accuracy",) + ("map", "micro_f1", "macro_f1", "images_without_labels") * several
    ok = isinstance(per_class, dict) and all(
        isinstance(m, dict)
        and all(isinstance(m.get(f), (int, float)) for f in fields)
        and (not several or m.get("ap") is None or isinstance(m.get("ap"), (int, float)))
        for m in per_class.values()
    )
    if not (ok and all(isinstance(value.get(f), (int, float)) for f in figures)):
        raise Damaged(f"{run.name}/evaluation.json is not an evaluation of transferlab: the run directory is damaged")
    return value


def benchmark_summary(bench: Folder) -> dict:
    """One row of the runs page for a benchmark: its best model and how many it compared."""
    rows = bench.data("leaderboard.json", list)
    for row in rows:
        if not (isinstance(row, dict) and isinstance(row.get("model"), str)):
            raise Damaged(f"{bench.name}/leaderboard.json is not a leaderboard (rows of models): it is damaged")
        _number(row.get("val_accuracy_best"), f"{bench.name}/leaderboard.json's val_accuracy_best")
    done = [r for r in rows if r.get("val_accuracy_best") is not None]
    best = max(done, key=lambda r: r["val_accuracy_best"], default=None)
    updated = bench.mtime("leaderboard.json")
    return {
        "name": bench.name,
        "kind": "benchmark",
        "backbone": f"{len(rows)} backbones, best: {best['model']}" if best else f"{len(rows)} backbones",
        "data": "",
        "best_val_accuracy": best["val_accuracy_best"] if best else None,
        "date": _stamp(updated),
        "updated": updated,
        "status": "finished" if len(done) == len(rows) else f"{len(done)} of {len(rows)} done",
        "rows": rows,
    }
