"""The one exception type a user can meet: printed as one line, exit status 2; and the one line for an OSError."""

import errno


class UserError(Exception):
    """A problem with the user's input or environment: what is wrong, where, what to do."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C: one line saying what was kept, and the shell's exit status for an interrupt."""

    exit_code = 130


_WHAT_TO_DO = {
    errno.ENOSPC: "the disk is full: free some space (df -h shows where), then run again",
    errno.EDQUOT: "the disk quota is used up: free some space, then run again",
    errno.EFBIG: "the file is over this process's size limit (ulimit -f): raise it, then run again",
    errno.EROFS: "the file system is read-only: copy the run to a writable folder, or pass another --out",
    errno.EACCES: "check its owner and permissions (ls -l), or run as the user it belongs to",
    errno.EPERM: "check its owner and permissions (ls -l), or run as the user it belongs to",
    errno.ENAMETOOLONG: "use a shorter name",
}


def os_error_line(e: OSError) -> str:
    """An OSError a user can meet (disk full, read-only, permissions) as one line: what, which file, what to do."""
    where = f" {e.filename}" if e.filename else ""
    what = e.strerror or str(e).splitlines()[0]
    return f"cannot use{where}: {what}; {_WHAT_TO_DO.get(e.errno, 'check the file and the disk, then run again')}"
