"""The web app: pages for runs, benchmarks, predictions and error review (pages.py), the HTTP API beside them (api.py),
and the project page's datasets and training queue (studio.py).

Server-rendered Jinja2 pages with a little plain JavaScript (static/app.js). Every answer to a
bad request is a 4xx with one line of JSON, ``{"error": "..."}``, and the server goes on serving.
Every file a route reads comes through ``catalog.Folder`` (no symlink followed, damaged runs a 409);
guard.py decides who may ask.
"""

import errno
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as AnyHTTPException

from transferlab.errors import UserError
from transferlab.serve import api, catalog, pages, studio
from transferlab.serve.guard import Guard
from transferlab.serve.jobs import Jobs
from transferlab.serve.limits import MAX_BODY_BYTES, MAX_FILE_BYTES, MAX_FILES, BodyLimit
from transferlab.serve.models import predictors, reviews
from transferlab.serve.projects import MAX_IMAGES, MAX_PIXELS, Projects, Refused

HERE = Path(__file__).parent


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


@asynccontextmanager
async def lifespan(app: FastAPI):
    """On shutdown, a run still training is cancelled (stopped.json says so), so it can be resumed."""
    yield
    app.state.jobs.close()


def create_app(
    runs_dir: str | Path, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES, host: str = "127.0.0.1", max_pixels: int = MAX_PIXELS,
    max_images: int = MAX_IMAGES,
) -> FastAPI:  # fmt: skip
    """The app serving every run and benchmark under ``runs_dir``; ``host``: the address it listens on (guard.py)."""
    app = FastAPI(
        title="transferlab", summary="Runs, benchmarks, predictions and error review of transferlab",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: /docs is ours, offline
        lifespan=lifespan,
    )  # fmt: skip
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Guard, host=host)  # outermost: another site's request is refused before its body is read
    for kind in (AnyHTTPException, RequestValidationError, catalog.BadName, catalog.NotFound, UserError):
        app.add_exception_handler(kind, error)  # also the router's own 404 and 405; a run's state is a 409
    app.add_exception_handler(Refused, studio.refused)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    state = app.state
    state.root, state.pages = Path(runs_dir), Jinja2Templates(directory=HERE / "templates")
    state.limits = {"max_files": max_files, "max_file_bytes": max_file_bytes}
    state.models, state.reviews = predictors(), reviews()  # one per run: a test can see that a model loaded once
    state.projects, state.jobs = Projects(state.root, max_pixels, max_images), Jobs(state.root)
    app.include_router(studio.router)
    app.include_router(api.router)
    app.include_router(pages.router)
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
