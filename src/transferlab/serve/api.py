"""The web app's HTTP API: the runs as JSON, a run's plots, and prediction on uploaded images.

Predictions go through ``transferlab.inference.predictor``, the one prediction path, so the API answers
exactly what ``transferlab predict --format json`` prints.
"""

import re
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response

from transferlab.serve import catalog
from transferlab.serve.limits import MAX_FILES

router = APIRouter()
EXPORT_NAME = re.compile(r"^[\w.-]+\.(onnx|pt|tflite)$")
MAX_PLOT_BYTES = 32 * 2**20  # a plot is read whole before its answer starts; transferlab's are under 1 MiB


@router.get("/files/{name:path}/{file}", include_in_schema=False)
def run_file(request: Request, name: str, file: str) -> Response:
    folder = catalog.folder(request.app.state.root, name)
    if file not in catalog.FILES or folder.kind is None or not folder.regular(file):
        raise HTTPException(404, f"no plot {file!r} in {catalog.short(name)}: only a run's plots are served")
    content = folder.read(file, MAX_PLOT_BYTES)  # all of it before the first byte of the answer
    return Response(content, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/api/runs", summary="Every run and benchmark under the runs folder (damaged ones with a reason)")
def api_runs(request: Request) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "rows"} for e in catalog.discover(request.app.state.root)]


@router.get(
    "/api/runs/{name:path}/review", summary="The error review's progress: working (with its step), ready or failed"
)
def api_review(request: Request, name: str) -> dict:
    folder, _ = catalog.run(request.app.state.root, name)
    work = request.app.state.reviews.get(folder.path)
    return {k: work[k] for k in ("state", "step", "elapsed_s", "error") if k in work}


@router.get("/api/runs/{name:path}", summary="One run: its summary, history, metrics and evaluation")
def api_run(request: Request, name: str) -> dict:
    folder, summary = catalog.run(request.app.state.root, name)
    metrics = {"metrics": folder.data("metrics.json", dict)} if folder.regular("metrics.json") else {}
    evaluation = catalog.evaluation(folder)
    return {**summary, "history": folder.history(), **metrics, **({"evaluation": evaluation} if evaluation else {})}


@router.post("/api/runs/{name:path}/predict", summary="Top-k classes per uploaded image (as predict --format json)")
def api_predict(
    request: Request,
    name: str,
    images: Annotated[list[UploadFile], File(description=f"One or more images, at most {MAX_FILES} by default")],
    k: Annotated[int, Query(ge=1, le=100, description="How many classes per image")] = 5,
    model: Annotated[
        str | None, Query(description="An export in the run folder (model.onnx); default: the run itself")
    ] = None,
) -> list[dict]:
    from transferlab.inference.predictor import predict

    state = request.app.state
    folder, summary = catalog.run(state.root, name)
    if model is not None and not (EXPORT_NAME.match(model) and model in summary["exports"]):
        raise HTTPException(
            400, f"model {model!r}: name an .onnx, .pt or .tflite file in the run folder (see /api/runs)"
        )
    check_uploads(images, **state.limits)
    predictor = state.models.get(folder.path, model)
    for upload in images:
        upload.file.seek(0)
    names = [u.filename or f"image{i}" for i, u in enumerate(images)]
    results = predict(predictor, [u.file for u in images], k=k, names=names)
    if len(results) < len(images):
        raise HTTPException(400, unreadable(predictor, images, names, {r["image"] for r in results}))
    return results


def check_uploads(images: list[UploadFile], max_files: int, max_file_bytes: int) -> None:
    """Refuse too many files, empty ones and ones over the size limit, before any is decoded."""
    if len(images) > max_files:
        raise HTTPException(413, f"{len(images)} files uploaded: at most {max_files} per request")
    for upload in images:
        if not upload.size:
            raise HTTPException(400, f"{upload.filename!r} is empty (0 bytes): upload an image file")
        if upload.size > max_file_bytes:
            raise HTTPException(
                413, f"{upload.filename!r} is {upload.size / 2**20:.1f} MiB: at most {max_file_bytes / 2**20:.0f} MiB"
            )


def unreadable(predictor, images: list[UploadFile], names: list[str], done: set[str]) -> str:
    """Why the first upload that got no prediction is not a readable image."""
    from transferlab.data.images import BadImage

    for upload, name in zip(images, names):
        if name not in done:
            upload.file.seek(0)
            try:
                predictor.load(upload.file)
            except BadImage as e:
                why = re.sub(r"\s*<[^>]*>", "", str(e))  # PIL names the spooled temporary file, not the upload
                return f"{name!r} is not a readable image ({why}): upload a JPEG, PNG or other picture"
    return "some uploads are not readable images: upload JPEG, PNG or other pictures"
