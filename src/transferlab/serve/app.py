"""The web app: pages for runs, benchmarks, predictions and error review, and the HTTP API beside them.

Server-rendered Jinja2 pages with a little plain JavaScript (static/app.js). Every answer to a
bad request is a 4xx with one line of JSON, ``{"error": "..."}``, and the server goes on serving.
Predictions go through ``transferlab.inference.predictor``, the one prediction path, so the API answers
exactly what ``transferlab predict --format json`` prints. Every file a route reads comes through
``catalog.Folder`` (no symlink followed, damaged runs a 409); guard.py decides who may ask.
"""

import base64
import errno
import io
import re
import socket
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as AnyHTTPException

from transferlab.errors import UserError
from transferlab.serve import catalog
from transferlab.serve.guard import Guard
from transferlab.serve.limits import MAX_BODY_BYTES, MAX_FILE_BYTES, MAX_FILES, BodyLimit
from transferlab.serve.models import predictors, reviews

HERE = Path(__file__).parent
EXPORT_NAME = re.compile(r"^[\w.-]+\.(onnx|pt)$")
MAX_PLOT_BYTES = 32 * 2**20  # a plot is read whole before its answer starts; transferlab's are under 1 MiB


def error(request: Request, exc: Exception) -> JSONResponse:
    """Every failure as one line of JSON."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 422)
    if isinstance(exc, AnyHTTPException):
        return JSONResponse({"error": str(exc.detail).splitlines()[0]}, exc.status_code, headers=exc.headers)
    status = {catalog.BadName: 400, catalog.NotFound: 404}.get(type(exc), 409)
    return JSONResponse({"error": (str(exc).splitlines() or [type(exc).__name__])[0]}, status)


def create_app(
    runs_dir: str | Path, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES, host: str = "127.0.0.1",
) -> FastAPI:  # fmt: skip
    """The app serving every run and benchmark under ``runs_dir``; ``host``: the address it listens on (guard.py)."""
    root = Path(runs_dir)
    app = FastAPI(
        title="transferlab", summary="Runs, benchmarks, predictions and error review of transferlab",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: /docs is ours, offline
    )  # fmt: skip
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Guard, host=host)  # outermost: another site's request is refused before its body is read
    for kind in (AnyHTTPException, RequestValidationError, catalog.BadName, catalog.NotFound, UserError):
        app.add_exception_handler(kind, error)  # also the router's own 404 and 405; a run's state is a 409
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Jinja2Templates(directory=HERE / "templates")
    app.state.models = models = predictors()  # one per run: a test can see that a model loaded once
    reviewed = reviews()

    def run(name: str) -> tuple[catalog.Folder, dict]:
        """A run's checked folder and summary: every route reads a run through this (catalog.Folder)."""
        folder = catalog.folder(root, name).expect("run")
        return folder, catalog.run_summary(folder)

    def page(request: Request, template: str, **context) -> HTMLResponse:
        return pages.TemplateResponse(request, template, {"root": root, **context})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def runs_page(request: Request) -> HTMLResponse:
        return page(request, "runs.html", entries=catalog.discover(root))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs_page(request: Request) -> HTMLResponse:
        return page(request, "docs.html", api=app.openapi())

    @app.get("/runs/{name:path}/predict", response_class=HTMLResponse, include_in_schema=False)
    def predict_page(request: Request, name: str) -> HTMLResponse:
        return page(request, "predict.html", run=run(name)[1], max_files=max_files)

    @app.get("/runs/{name:path}/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page(request: Request, name: str) -> HTMLResponse:
        folder, summary = run(name)
        return page(request, "review.html", run=summary, review=reviewed.get(folder.path), png=png_uri)

    @app.get("/runs/{name:path}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, name: str) -> HTMLResponse:
        folder, summary = run(name)
        config, evaluation = folder.text("config.yaml"), catalog.evaluation(folder)
        return page(request, "run.html", run=summary, config=config, evaluation=evaluation)

    @app.get("/benchmarks/{name:path}", response_class=HTMLResponse, include_in_schema=False)
    def benchmark_page(request: Request, name: str) -> HTMLResponse:
        from transferlab.benchmark import COLUMNS, _safe

        bench = catalog.benchmark_summary(catalog.folder(root, name).expect("benchmark"))
        members = {r["model"]: f"{name}/{_safe(r['model'])}" for r in bench["rows"]}
        members = {m: n for m, n in members.items() if is_run(n)}
        return page(request, "benchmark.html", bench=bench, columns=COLUMNS, members=members)

    def is_run(name: str) -> bool:
        try:
            return catalog.folder(root, name).kind == "run"
        except (catalog.BadName, catalog.NotFound, UserError):
            return False

    @app.get("/files/{name:path}/{file}", include_in_schema=False)
    def run_file(name: str, file: str) -> Response:
        folder = catalog.folder(root, name)
        if file not in catalog.FILES or folder.kind is None or not folder.regular(file):
            raise HTTPException(404, f"no plot {file!r} in {catalog.short(name)}: only a run's plots are served")
        content = folder.read(file, MAX_PLOT_BYTES)  # all of it before the first byte of the answer
        return Response(content, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs", summary="Every run and benchmark under the runs folder (damaged ones with a reason)")
    def api_runs() -> list[dict]:
        return [{k: v for k, v in e.items() if k != "rows"} for e in catalog.discover(root)]

    @app.get("/api/runs/{name:path}", summary="One run: its summary, history, metrics and evaluation")
    def api_run(name: str) -> dict:
        folder, summary = run(name)
        metrics = {"metrics": folder.data("metrics.json", dict)} if folder.regular("metrics.json") else {}
        evaluation = catalog.evaluation(folder)
        return {**summary, "history": folder.history(), **metrics, **({"evaluation": evaluation} if evaluation else {})}

    @app.post("/api/runs/{name:path}/predict", summary="Top-k classes per uploaded image (as predict --format json)")
    def api_predict(
        name: str,
        images: Annotated[list[UploadFile], File(description=f"One or more images, at most {max_files}")],
        k: Annotated[int, Query(ge=1, le=100, description="How many classes per image")] = 5,
        model: Annotated[
            str | None, Query(description="An export in the run folder (model.onnx); default: the run itself")
        ] = None,
    ) -> list[dict]:
        from transferlab.inference.predictor import predict

        folder, summary = run(name)
        if model is not None and not (EXPORT_NAME.match(model) and model in summary["exports"]):
            raise HTTPException(400, f"model {model!r}: name an .onnx or .pt file in the run folder (see /api/runs)")
        check_uploads(images, max_files, max_file_bytes)
        predictor = models.get(folder.path, model)
        for upload in images:
            upload.file.seek(0)
        names = [u.filename or f"image{i}" for i, u in enumerate(images)]
        results = predict(predictor, [u.file for u in images], k=k, names=names)
        if len(results) < len(images):
            raise HTTPException(400, unreadable(predictor, images, names, {r["image"] for r in results}))
        return results

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before anything says "serving": a busy port is one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot serve on {host!r} ({e.strerror}): pass an address of this machine to --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a just-stopped server's port
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is in use: stop what listens there or pass another --port (0 picks a free one)"
            ) from None
        raise UserError(f"cannot listen on {host} port {port} ({e.strerror}): pass another --host or --port") from None
    return sock


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


def png_uri(pixels: np.ndarray) -> str:
    """An RGB array as a data: URI for an <img>, so a review needs no files of its own."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
