"""The web app's pages: the runs list, a run, its predict and review pages, a benchmark, and /docs.

Server-rendered (templates/); what each page needs lives on ``app.state`` (see ``app.create_app``).
"""

import base64
import io

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from transferlab.errors import UserError
from transferlab.serve import catalog

router = APIRouter(include_in_schema=False)


def page(request: Request, template: str, **context) -> HTMLResponse:
    state = request.app.state
    return state.pages.TemplateResponse(request, template, {"root": state.root, **context})


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request) -> HTMLResponse:
    return page(request, "runs.html", entries=catalog.discover(request.app.state.root))


@router.get("/docs", response_class=HTMLResponse)
def docs_page(request: Request) -> HTMLResponse:
    return page(request, "docs.html", api=request.app.openapi())


@router.get("/runs/{name:path}/predict", response_class=HTMLResponse)
def predict_page(request: Request, name: str) -> HTMLResponse:
    state = request.app.state
    return page(request, "predict.html", run=catalog.run(state.root, name)[1], max_files=state.limits["max_files"])


@router.get("/runs/{name:path}/review", response_class=HTMLResponse)
def review_page(request: Request, name: str) -> HTMLResponse:
    state = request.app.state
    folder, summary = catalog.run(state.root, name)
    return page(request, "review.html", run=summary, review=state.reviews.get(folder.path), png=png_uri)


@router.get("/runs/{name:path}", response_class=HTMLResponse)
def run_page(request: Request, name: str) -> HTMLResponse:
    folder, summary = catalog.run(request.app.state.root, name)
    config, evaluation = folder.text("config.yaml"), catalog.evaluation(folder)
    return page(request, "run.html", run=summary, config=config, evaluation=evaluation)


@router.get("/benchmarks/{name:path}", response_class=HTMLResponse)
def benchmark_page(request: Request, name: str) -> HTMLResponse:
    from transferlab.benchmark import COLUMNS, member_folder

    root = request.app.state.root
    bench = catalog.benchmark_summary(catalog.folder(root, name).expect("benchmark"))
    members = {r["model"]: f"{name}/{member_folder(r['model'])}" for r in bench["rows"]}
    members = {m: n for m, n in members.items() if _is_run(root, n)}
    return page(request, "benchmark.html", bench=bench, columns=COLUMNS, members=members)


def _is_run(root, name: str) -> bool:
    try:
        return catalog.folder(root, name).kind == "run"
    except (catalog.BadName, catalog.NotFound, UserError):
        return False


def png_uri(pixels: np.ndarray) -> str:
    """An RGB array as a data: URI for an <img>, so a review needs no files of its own."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
