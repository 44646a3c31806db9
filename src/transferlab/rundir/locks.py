"""One writer per run directory (and per benchmark): an advisory lock beside the folder, named by its holder.

The lock is ``fcntl.flock`` on ``<parent>/.<name>.lock``, beside the folder rather than inside it, so that
it outlives the swap of an ``--overwrite`` (the folder itself is replaced). The kernel drops the lock when its
process dies however it dies, so a stale lock of a dead process is simply taken over; the file keeps the
holder's pid and command only to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from transferlab.errors import UserError


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def hold(folder: str | Path, what: str, create: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise one UserError line naming the process that holds it.

    ``what`` says what this process does (``train``, ``export``): the next one to ask is told. Only a command
    that makes the folder (``create``: train, benchmark) makes the folders above it; the others need it there.
    """
    path = lock_path(folder)
    if not create and not Path(folder).is_dir():
        raise UserError(f"{folder} is not a transferlab run (no such folder): pass a run directory from `train`")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise UserError(f"cannot lock {folder} ({e.strerror}: {path}): check the folder's permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"{folder} is in use by {holder}: wait until it ends (or stop it), or choose another folder"
            ) from None
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv[:6]))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({what}: {command}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


class RunLock:
    """A folder's lock, taken once (``take``) and held until ``release`` or the end of a ``with`` block."""

    def __init__(self) -> None:
        self._stack, self.held = ExitStack(), False

    def take(self, folder: str | Path, what: str) -> None:
        if not self.held:
            self._stack.enter_context(hold(folder, what, create=True))
            self.held = True

    def release(self) -> None:
        self._stack.close()
        self.held = False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_) -> None:
        self.release()
