"""The web app: pages for runs, benchmarks, predictions and error review, and the HTTP API beside them.

Server-rendered Jinja2 pages with a little plain JavaScript (static/app.js). Every answer to a
bad request is a 4xx with one line of JSON, ``{"error": "..."}``, and the server goes on serving.
Predictions go through ``transferlab.inference``, the one prediction path, so the API answers
exactly what ``transferlab predict --format json`` prints.
"""

import base64
import io
import re
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as AnyHTTPException

from transferlab.errors import UserError
from transferlab.run import RunDir
from transferlab.serve import catalog
from transferlab.serve.limits import MAX_BODY_BYTES, MAX_FILE_BYTES, MAX_FILES, BodyLimit
from transferlab.serve.models import predictors, reviews

HERE = Path(__file__).parent
EXPORT_NAME = re.compile(r"^[\w.-]+\.(onnx|pt)$")


def error(request: Request, exc: Exception) -> JSONResponse:
    """Every failure as one line of JSON."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 422)
    return JSONResponse({"error": str(exc.detail).splitlines()[0]}, exc.status_code, headers=exc.headers)


def create_app(
    runs_dir: str | Path, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:  # fmt: skip
    """The app serving every run and benchmark under ``runs_dir``."""
    root = Path(runs_dir)
    app = FastAPI(title="transferlab", summary="Runs, benchmarks, predictions and error review of transferlab")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_exception_handler(AnyHTTPException, error)  # also the router's own 404 and 405
    app.add_exception_handler(RequestValidationError, error)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Jinja2Templates(directory=HERE / "templates")
    app.state.models = models = predictors()  # one per run: a test can see that a model loaded once
    reviewed = reviews()

    # A run's own state (no checkpoint yet, damaged files) is a 409 with the library's one-line UserError.

    def find(name: str, kind: str = "run") -> Path:
        try:
            path = catalog.resolve(root, name)
        except catalog.BadName as e:
            raise HTTPException(400, str(e)) from None
        if not (catalog.is_run if kind == "run" else catalog.is_benchmark)(path):
            raise HTTPException(404, f"no {kind} named {name!r} in {root}: see /api/runs")
        return path

    def summary(name: str) -> dict:
        try:
            return catalog.run_summary(find(name), name)
        except UserError as e:
            raise HTTPException(409, str(e)) from None

    def page(request: Request, template: str, **context) -> HTMLResponse:
        return pages.TemplateResponse(request, template, {"root": root, **context})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def runs_page(request: Request) -> HTMLResponse:
        return page(request, "runs.html", entries=catalog.discover(root))

    @app.get("/runs/{name:path}/predict", response_class=HTMLResponse, include_in_schema=False)
    def predict_page(request: Request, name: str) -> HTMLResponse:
        return page(request, "predict.html", run=summary(name), max_files=max_files)

    @app.get("/runs/{name:path}/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page(request: Request, name: str) -> HTMLResponse:
        run = summary(name)
        try:
            review = reviewed.get(find(name))
        except UserError as e:
            raise HTTPException(409, str(e)) from None
        return page(request, "review.html", run=run, review=review, png=png_uri)

    @app.get("/runs/{name:path}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, name: str) -> HTMLResponse:
        run, path = summary(name), find(name)
        read = lambda f: (path / f).read_text() if (path / f).is_file() else ""  # noqa: E731
        evaluation = RunDir(path).read_json("evaluation.json") if (path / "evaluation.json").is_file() else {}
        return page(request, "run.html", run=run, config=read("config.yaml"), evaluation=evaluation, path=path)

    @app.get("/benchmarks/{name:path}", response_class=HTMLResponse, include_in_schema=False)
    def benchmark_page(request: Request, name: str) -> HTMLResponse:
        from transferlab.benchmark import COLUMNS, _safe

        path = find(name, "benchmark")
        bench = catalog.benchmark_summary(path, name)
        members = {r["model"]: f"{name}/{_safe(r['model'])}" for r in bench["rows"]}
        members = {m: n for m, n in members.items() if catalog.is_run(root / n)}
        return page(request, "benchmark.html", bench=bench, columns=COLUMNS, members=members)

    @app.get("/files/{name:path}/{file}", include_in_schema=False)
    def run_file(name: str, file: str) -> FileResponse:
        try:
            path = catalog.resolve(root, name) / file
        except catalog.BadName as e:
            raise HTTPException(400, str(e)) from None
        if file not in catalog.FILES or not path.is_file():
            raise HTTPException(404, f"no file {file!r} in {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs", summary="Every run and benchmark under the runs folder")
    def api_runs() -> list[dict]:
        return [{k: v for k, v in e.items() if k != "rows"} for e in catalog.discover(root)]

    @app.get("/api/runs/{name:path}", summary="One run: its summary, history, metrics and evaluation")
    def api_run(name: str) -> dict:
        run = summary(name)
        rd = RunDir(find(name))
        extra = {f: rd.read_json(f"{f}.json") for f in ("metrics", "evaluation") if (rd.path / f"{f}.json").is_file()}
        return {**run, "history": rd.read_history(), **extra}

    @app.post("/api/runs/{name:path}/predict", summary="Top-k classes per uploaded image (as predict --format json)")
    def api_predict(
        name: str,
        images: Annotated[list[UploadFile], File(description=f"One or more images, at most {max_files}")],
        k: Annotated[int, Query(ge=1, le=100, description="How many classes per image")] = 5,
        model: Annotated[
            str | None, Query(description="An export in the run folder (model.onnx); default: the run itself")
        ] = None,
    ) -> list[dict]:
        from transferlab.inference import predict

        path = find(name)
        if model is not None and not (EXPORT_NAME.match(model) and (path / model).is_file()):
            raise HTTPException(400, f"model {model!r}: name an .onnx or .pt file in the run folder (see /api/runs)")
        check_uploads(images, max_files, max_file_bytes)
        try:
            predictor = models.get(path, model)
        except UserError as e:
            raise HTTPException(409, str(e)) from None
        for upload in images:
            upload.file.seek(0)
        names = [u.filename or f"image{i}" for i, u in enumerate(images)]
        results = predict(predictor, [u.file for u in images], k=k, names=names)
        if len(results) < len(images):
            raise HTTPException(400, unreadable(predictor, images, names, {r["image"] for r in results}))
        return results

    return app


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
    from transferlab.images import BadImage

    for upload, name in zip(images, names):
        if name not in done:
            upload.file.seek(0)
            try:
                predictor.load(upload.file)
            except BadImage as e:
                why = re.sub(r"\s*<[^>]*>", "", str(e))  # PIL names the spooled temporary file, not the upload
                return f"{name!r} is not a readable image ({why}): upload a JPEG, PNG or other picture"
    return "some uploads are not readable images: upload JPEG, PNG or other pictures"


def png_uri(pixels: np.ndarray) -> str:
    """An RGB array as a data: URI for an <img>, so a review needs no files of its own."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
