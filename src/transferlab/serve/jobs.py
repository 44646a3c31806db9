"""Training runs started from the web app: one at a time, the others waiting in a visible queue.

Each job is ``transferlab train`` (or ``train --resume``, or ``export``) in a child process of its own
session, so that cancelling it stops its data-loading workers too and a crash cannot take the server
down. The child writes its run directory as it would from a terminal; its output goes to
``<runs folder>/.jobs/<id>.log``, whose last progress line the page shows. A cancelled or crashed
run gets ``stopped.json`` (``{"status": "cancelled" | "failed", "why": ...}``), which the runs page
shows, and is resumed from its last checkpoint (or started again when it had none).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transferlab.files import atomic_write

GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL on cancel
PROGRESS_SECONDS = "2"  # how often a child's long steps print a line (progress.py)


@dataclass
class Job:
    id: int
    kind: str  # train, resume or export
    run: str  # the run's name under the runs folder
    args: list[str]  # after ``python -m transferlab``
    project: str | None = None
    budget_s: float | None = None
    state: str = "queued"  # queued, running, finished, cancelled or failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    message: str = ""  # the child's last line
    cancelling: bool = False

    def public(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("args", "cancelling")}
        now = self.ended or time.time()
        out["elapsed_s"] = round(now - self.started, 1) if self.started else 0.0
        if self.budget_s and self.state == "running":
            out["left_s"] = round(max(0.0, self.budget_s - out["elapsed_s"]), 1)
        return out


class Jobs:
    """The queue: ``submit`` appends, one worker thread runs the jobs in order, ``cancel`` stops one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / ".jobs"
        self.jobs: list[Job] = []
        self.changed = threading.Condition()
        self.version = 0  # bumped on every change, so a stream sends only news
        self._process: subprocess.Popen | None = None
        self._worker: threading.Thread | None = None

    def submit(self, kind: str, run: str, args: list[str], project: str | None = None,
               budget_s: float | None = None) -> Job:  # fmt: skip
        with self.changed:
            job = Job(len(self.jobs) + 1, kind, run, args, project, budget_s)
            self.jobs.append(job)
            self._bump()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="transferlab-jobs", daemon=True)
                self._worker.start()
        return job

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def busy(self, project: str) -> Job | None:
        """A queued or running job that trains on ``project`` (its images must not change under it)."""
        return next((j for j in self.jobs if j.project == project and j.state in ("queued", "running")), None)

    def active(self, run: str) -> Job | None:
        return next((j for j in self.jobs if j.run == run and j.state in ("queued", "running")), None)

    def snapshot(self) -> list[dict]:
        with self.changed:
            queued = [j.id for j in self.jobs if j.state == "queued"]
            return [{**j.public(), "position": queued.index(j.id) + 1 if j.id in queued else None} for j in self.jobs]

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue; a running one is stopped (SIGTERM, then SIGKILL) and marked cancelled."""
        with self.changed:
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
                self._bump()
                return
            if job.state != "running":
                return
            job.cancelling = True
            process = self._process
        if process is not None:
            _signal(process, signal.SIGTERM)
            try:
                process.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
        with self.changed:  # answered once stopped.json is written and the job says cancelled
            self.changed.wait_for(lambda: job.state != "running", GRACE_SECONDS + 5)

    def wait(self, version: int, timeout: float) -> int:
        """Block until something changed since ``version`` (or ``timeout``): the new version."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def close(self) -> None:
        """Stop the running job, if any, when the server stops: it is marked cancelled and can be resumed."""
        with self.changed:
            for job in self.jobs:
                if job.state == "queued":
                    job.state = "cancelled"
            running = next((j for j in self.jobs if j.state == "running"), None)
        if running is not None:
            self.cancel(running)

    def _bump(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def _work(self) -> None:
        while True:
            with self.changed:
                job = next((j for j in self.jobs if j.state == "queued"), None)
                if job is None:
                    return
                job.state, job.started = "running", time.time()
                self._bump()
            self._run(job)

    def _run(self, job: Job) -> None:
        self.logs.mkdir(exist_ok=True)
        if job.kind == "resume":
            (self.root / job.run / "stopped.json").unlink(missing_ok=True)
        log = self.logs / f"{job.id}.log"
        env = {**os.environ, "TRANSFERLAB_PROGRESS_SECONDS": PROGRESS_SECONDS, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "transferlab", *job.args], stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=self.root, env=env, start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                self._end(job, "failed", f"could not start transferlab ({e.strerror})")
                return
            with self.changed:
                self._process = process
            while process.poll() is None:
                time.sleep(0.5)
                self._follow(job, log)
        self._follow(job, log)
        with self.changed:
            self._process = None
        if job.cancelling:
            self._end(job, "cancelled", "cancelled from the web app")
        elif process.returncode == 0:
            self._end(job, "finished", job.message)
        else:
            self._end(job, "failed", job.message or f"transferlab exited with status {process.returncode}")

    def _follow(self, job: Job, log: Path) -> None:
        """The log's last non-empty line as the job's message (read from the end: a log can grow long)."""
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = [x.strip() for x in f.read().decode(errors="replace").replace("\r", "\n").splitlines()]
        message = next((x for x in reversed(lines) if x and not x.startswith(("Traceback", "File "))), "")
        if message != job.message:
            with self.changed:
                job.message = message[:300]
                self._bump()

    def _end(self, job: Job, state: str, why: str) -> None:
        run = self.root / job.run
        if state in ("cancelled", "failed") and job.kind != "export" and run.is_dir() and not run.is_symlink():
            record = {"status": state, "why": why, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "job": job.id}
            atomic_write(run / "stopped.json", json.dumps(record, indent=1) + "\n")
        with self.changed:
            job.state, job.ended, job.message = state, time.time(), why[:300]
            self._bump()


def _signal(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, sig)  # its own session: the data-loading workers too
