"""The project page's API: make a dataset in the browser, train on it in the queue, follow, cancel, resume, export.

Projects live in ``projects.py``, the queue in ``jobs.py``; this module is the HTTP around them. Progress
is streamed as server-sent events (``/api/jobs/events``): the whole queue, and for each job its run's
phase, epoch, accuracy so far, time left and history, sent whenever any of it changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Annotated

from fastapi import APIRouter, Body, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from transferlab.errors import UserError
from transferlab.serve import catalog
from transferlab.serve.api import check_uploads
from transferlab.serve.projects import Refused, check_name

router = APIRouter()
BACKBONE = re.compile(r"^[\w.-]{1,80}$")
MIN_BUDGET, MAX_BUDGET = 30, 3600  # seconds: the page's slider
EXPORT_FORMATS = ("onnx", "tflite", "torchscript")
DOWNLOADS = {
    ".onnx": "application/octet-stream",
    ".tflite": "application/octet-stream",
    ".pt": "application/octet-stream",
}
TICK = 1.0  # seconds between two looks at the running job's files
FOLLOWED = 10  # the latest jobs whose runs' progress each event carries


def refused(request: Request, exc: Refused) -> JSONResponse:
    return JSONResponse({"error": str(exc).splitlines()[0]}, exc.status)


def _state(request: Request):
    return request.app.state


@router.get("/api/projects", summary="Every project: its classes and how many images each holds")
def api_projects(request: Request) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "classes"} for p in _state(request).projects.list()]


@router.post("/api/projects", summary="A new project with its classes", status_code=201)
def api_new_project(
    request: Request, name: Annotated[str, Body(max_length=200)], classes: Annotated[list[str], Body(max_length=100)]
) -> dict:
    return _state(request).projects.create(name, classes)


@router.get("/api/projects/{project}", summary="One project: each class's images")
def api_project(request: Request, project: str) -> dict:
    return _state(request).projects.get(project)


def _unlocked(request: Request, project: str) -> None:
    job = _state(request).jobs.busy(check_name(project, "project"))
    if job is not None:
        raise HTTPException(409, f"project {project!r} is training (job {job.id}): change it once the job ends")


@router.post("/api/projects/{project}/classes", summary="Add a class", status_code=201)
def api_add_class(request: Request, project: str, name: Annotated[str, Body(embed=True, max_length=200)]) -> dict:
    _unlocked(request, project)
    return _state(request).projects.add_class(project, name)


@router.post("/api/projects/{project}/classes/{klass}/rename", summary="Rename a class (never onto another)")
def api_rename(
    request: Request, project: str, klass: str, to: Annotated[str, Body(embed=True, max_length=200)]
) -> dict:
    _unlocked(request, project)
    return _state(request).projects.rename_class(project, klass, to)


@router.delete("/api/projects/{project}/classes/{klass}", summary="Delete a class and its images")
def api_delete_class(request: Request, project: str, klass: str) -> dict:
    _unlocked(request, project)
    return _state(request).projects.delete_class(project, klass)


@router.post("/api/projects/{project}/classes/{klass}/images", summary="Add images to a class", status_code=201)
def api_add_images(
    request: Request, project: str, klass: str, images: Annotated[list[UploadFile], File(description="Images")]
) -> dict:
    _unlocked(request, project)
    state = _state(request)
    check_uploads(images, **state.limits)
    stored = state.projects.add_images(project, klass, [(u.filename or "image", u.file.read()) for u in images])
    return {"stored": stored, **state.projects.get(project)}


@router.delete("/api/projects/{project}/classes/{klass}/images/{file}", summary="Remove one image")
def api_delete_image(request: Request, project: str, klass: str, file: str) -> dict:
    _unlocked(request, project)
    return _state(request).projects.delete_image(project, klass, file)


@router.get("/project-files/{project}/{klass}/{file}", include_in_schema=False)
def project_image(request: Request, project: str, klass: str, file: str) -> Response:
    from transferlab.serve.projects import FORMATS

    fd = _state(request).projects.open_image(project, klass, file)
    with open(fd, "rb") as f:
        data = f.read(64 * 2**20)
    kind = {v: k.lower() for k, v in FORMATS.items()}[os.path.splitext(file)[1]]
    return Response(data, media_type=f"image/{kind}", headers={"X-Content-Type-Options": "nosniff"})


@router.post("/api/projects/{project}/train", summary="Queue a training run on the project", status_code=202)
def api_train(
    request: Request,
    project: str,
    backbone: Annotated[str, Body()] = "efficientnet_lite0",
    budget_s: Annotated[int, Body(ge=MIN_BUDGET, le=MAX_BUDGET)] = 120,
    image_size: Annotated[int | None, Body(ge=32, le=1024)] = None,
) -> dict:
    state = _state(request)
    held = state.projects.get(project)
    filled = [c for c, n in held["counts"].items() if n >= 2]
    if len(filled) < 2:
        raise HTTPException(400, f"project {project!r} needs two classes with two images or more each to train")
    if not BACKBONE.match(backbone):
        raise HTTPException(400, f"backbone {backbone[:80]!r}: give a zoo or timm model name")
    run = _free_run(state, held["name"])
    args = ["train", str(state.projects.path(held["name"])), "--out", str(state.root / run), "--backbone", backbone,
            "--time-budget", f"{budget_s}s", *(["--image-size", str(image_size)] if image_size else [])]  # fmt: skip
    return state.jobs.submit("train", run, args, project=held["name"], budget_s=budget_s).public()


def _free_run(state, project: str) -> str:
    """``<project>-<n>``: the first n no folder under the runs folder and no job has."""
    taken = {j.run for j in state.jobs.jobs}
    n = 1
    while f"{project}-{n}" in taken or os.path.lexists(state.root / f"{project}-{n}"):
        n += 1
    return f"{project}-{n}"


@router.get("/api/jobs", summary="The queue: every job of this server, with its state and place")
def api_jobs(request: Request) -> list[dict]:
    return _progress(request)


@router.post("/api/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
def api_cancel(request: Request, job_id: int) -> dict:
    jobs = _state(request).jobs
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}: see /api/jobs")
    jobs.cancel(job)
    return job.public()


@router.post("/api/runs/{name:path}/resume", summary="Resume a cancelled or failed run from its last checkpoint")
def api_resume(request: Request, name: str) -> dict:
    state = _state(request)
    catalog.resolve(state.root, name)  # a name inside the runs folder
    if state.jobs.active(name):
        raise HTTPException(409, f"{catalog.short(name)} is queued or training already: see /api/jobs")
    earlier = next((j for j in reversed(state.jobs.jobs) if j.run == name and j.kind != "export"), None)
    try:
        folder = catalog.folder(state.root, name)
    except catalog.NotFound:
        folder = None  # cancelled before it wrote anything
    if folder is not None and "last.ckpt" in folder.checkpoints:
        if folder.kind == "run" and catalog.run_summary(folder)["status"] == "finished":
            raise HTTPException(409, f"{catalog.short(name)} is finished: train a new run instead")
        args = ["train", "--resume", str(folder.path)]
    elif earlier is not None:  # stopped before its first checkpoint: start it again, as it was asked
        args = earlier.args
    else:
        raise HTTPException(409, f"{catalog.short(name)} has no checkpoint to resume from: train a new run")
    budget, project = (earlier.budget_s, earlier.project) if earlier else (None, None)
    return state.jobs.submit("resume", name, args, project=project, budget_s=budget).public()


@router.post("/api/runs/{name:path}/export", summary="Queue an export of a finished run", status_code=202)
def api_export(
    request: Request, name: str, format: Annotated[str, Query(pattern="^(onnx|tflite|torchscript)$")] = "onnx"
) -> dict:
    state = _state(request)
    folder, summary = catalog.run(state.root, name)
    if summary["status"] != "finished":
        raise HTTPException(409, f"{catalog.short(name)} is {summary['status']}: export it once it has finished")
    return state.jobs.submit("export", folder.name, ["export", str(folder.path), "--format", format]).public()


@router.get("/download/{name:path}/{file}", include_in_schema=False)
def download(request: Request, name: str, file: str) -> StreamingResponse:
    folder, summary = catalog.run(_state(request).root, name)
    if file not in summary["exports"]:
        raise HTTPException(404, f"no export {file[:80]!r} in {catalog.short(name)}: see its page")
    fd = catalog.open_under(folder.root, [*folder.name.split("/"), file], directory=False)

    def chunks():
        with open(fd, "rb") as f:  # closed once sent
            while block := f.read(2**20):
                yield block

    headers = {"Content-Disposition": f'attachment; filename="{file}"', "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(chunks(), media_type=DOWNLOADS[os.path.splitext(file)[1]], headers=headers)


@router.get("/api/jobs/events", summary="The queue and each job's progress as server-sent events")
async def job_events(request: Request) -> StreamingResponse:
    jobs = _state(request).jobs

    async def stream():
        version, sent = -1, None
        while not await request.is_disconnected():
            version = await asyncio.to_thread(jobs.wait, version, TICK)
            payload = json.dumps(await asyncio.to_thread(_progress, request))
            if payload != sent:
                sent = payload
                yield f"data: {payload}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _progress(request: Request) -> list[dict]:
    """The queue, each train job with its run's progress (phase, epoch, accuracy, history) read from its files."""
    state = _state(request)
    jobs = state.jobs.snapshot()
    for job in jobs[-FOLLOWED:]:  # the older ones' runs are on the runs page
        if job["kind"] != "export" and job["state"] != "queued":
            job["run_progress"] = _run_progress(state.root, job["run"])
    return jobs


def _run_progress(root, name: str) -> dict | None:
    try:
        folder = catalog.folder(root, name)
        if folder.kind != "run":
            return None
        summary = catalog.run_summary(folder)
        history = [
            {k: r.get(k) for k in ("epoch", "phase", "train_accuracy", "val_accuracy")} for r in folder.history()
        ]
    except (catalog.NotFound, UserError):
        return None
    keep = ("status", "phase", "epoch", "epochs_total", "best_val_accuracy", "curves_version", "exports")
    return {**{k: summary[k] for k in keep}, "history": history}
