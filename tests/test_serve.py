"""`transferlab serve` and `transferlab review`: the API with good and bad uploads, the pages, and a real browser.

One real benchmark of one tiny run (64 px, one epoch of each phase) in a runs folder, beside a copy
of that run without metrics.json, as a run still training looks. The browser is Debian's chromium,
driven by Playwright's Python API (no browser download).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import DATASETS, ROOT, make_subset, run_cli
from PIL import Image

from transferlab.review import rank, with_section
from transferlab.serve.catalog import BadName, resolve

ANT = DATASETS / "hymenoptera" / "val" / "ants" / "10308379_1b6c72e180.jpg"
BEE = DATASETS / "hymenoptera" / "val" / "bees" / "1032546534_06907fe3b3.jpg"
MEMBER = "bench/efficientnet_lite0"
LIMITS = dict(max_files=3, max_file_bytes=400_000, max_body_bytes=1_000_000)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


# --- fast: names and ranking -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../etc", "a/../../etc", "/etc/passwd", "a//b", "a\\..\\b", ".", ""])
def test_names_that_could_leave_the_runs_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadName, match="bad run name"):
        resolve(tmp_path, name)
    assert resolve(tmp_path, "bench/efficientnet_lite0") == tmp_path / "bench" / "efficientnet_lite0"


def test_rank_orders_by_loss_and_doubts_labels_by_confident_learning() -> None:
    # thresholds: class 0 gets 0.66 on average on its own images, class 1 gets 0.5
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.45, 0.55], [0.1, 0.9], [0.6, 0.4], [0.8, 0.2]])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    worst, doubted = rank(probs, labels, 3)
    assert doubted == [6, 2, 3]  # another class at or over its threshold, by margin over the given label
    # 5 loses more than 3, but its 0.6 for class 0 stays under what class 0 usually gets: the model's mistake
    assert worst == [5, 1, 4]
    assert rank(probs, labels, 1) == ([2], [6])  # 2 is doubted too, but only one fits in that list


def test_review_section_is_replaced_not_repeated() -> None:
    report = "# run\n\n## Learning curves\n\nx\n"
    once = with_section(report, "## Review\n\nfirst\n")
    twice = with_section(once, "## Review\n\nsecond\n")
    assert twice.count("## Review") == 1 and "second" in twice and "first" not in twice
    assert twice.startswith(report.rstrip("\n"))
    middle = with_section("# r\n\n## Review\n\nold\n\n## Later\n\ny\n", "## Review\n\nnew\n")
    assert middle == "# r\n\n## Review\n\nnew\n\n## Later\n\ny\n"


# --- one real run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/bench (a benchmark of one real tiny run), runs/live (that run as it looks while training)."""
    from transferlab.benchmark import run_benchmark

    tmp = tmp_path_factory.mktemp("serve")
    data = make_subset(tmp / "data", train=16, val=10)
    root = tmp / "runs"
    args = ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "16"]
    rows = run_benchmark(data, "efficientnet_lite0", root / "bench", args)
    assert rows[0]["status"] == "done", rows
    live = root / "live"
    live.mkdir()
    for f in ("config.yaml", "history.csv", "curves.png"):
        shutil.copy(root / MEMBER / f, live / f)
    first_epoch = (live / "history.csv").read_text().splitlines()[:2]
    (live / "history.csv").write_text("\n".join(first_epoch) + "\n")
    return root


@pytest.fixture(scope="module")
def app(runs):
    from transferlab.serve.app import create_app

    return create_app(runs, **LIMITS)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def post(client, name: str, files: list[tuple[str, bytes]], **params):
    return client.post(f"/api/runs/{name}/predict", params=params, files=[("images", f) for f in files])


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


@pytest.mark.slow
def test_api_runs_lists_runs_benchmarks_and_a_run_in_training(client) -> None:
    entries = {e["name"]: e for e in client.get("/api/runs").json()}
    assert set(entries) == {"bench", MEMBER, "live"}
    run = entries[MEMBER]
    assert run["kind"] == "run" and run["backbone"] == "efficientnet_lite0" and run["status"] == "finished"
    assert run["classes"] == ["ants", "bees"] and 0 <= run["best_val_accuracy"] <= 1 and run["epochs_total"] == 2
    assert entries["bench"]["kind"] == "benchmark" and entries["bench"]["status"] == "finished"
    assert entries["live"]["status"] == "training" and entries["live"]["epoch"] == 1
    detail = client.get(f"/api/runs/{MEMBER}").json()
    assert [h["phase"] for h in detail["history"]] == ["feature_extraction", "fine_tune"]
    assert detail["evaluation"]["num_images"] == 20


@pytest.mark.slow
def test_predict_answers_what_predict_format_json_prints(client, runs) -> None:
    from transferlab.inference import open_predictor, predict, render

    response = post(client, MEMBER, [(ANT.name, ANT.read_bytes()), (BEE.name, BEE.read_bytes())], k=2)
    assert response.status_code == 200, response.text
    expected = json.loads(render(predict(open_predictor(run=runs / MEMBER), [ANT, BEE], k=2), "json"))
    for e in expected:
        e["image"] = Path(e["image"]).name
    assert response.json() == expected


def bomb() -> bytes:
    """A 10000 x 10000 PNG of a few kilobytes: 100 million pixels, over the decoder's pixel limit."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def noise(side: int) -> bytes:
    """A PNG that does not compress: ``side`` x ``side`` x 3 bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD_UPLOADS = {
    "not an image": ([("notes.txt", b"these are not pixels\n")], 400, "not a readable image"),
    "zero bytes": ([("empty.jpg", b"")], 400, "empty"),
    "truncated": ([("half.jpg", ANT.read_bytes()[:2000])], 400, "not a readable image"),
    "decompression bomb": ([("bomb.png", bomb())], 400, "pixel"),
    "file over the size limit": ([("big.png", noise(400))], 413, "MiB"),
    "too many files": ([(f"{i}.jpg", ANT.read_bytes()) for i in range(4)], 413, "at most 3"),
    "body over the limit": ([(f"{i}.png", noise(350)) for i in range(3)], 413, "limit"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_one_line_4xx_and_the_server_keeps_serving(client, case: str) -> None:
    files, status, words = BAD_UPLOADS[case]
    assert words in one_line_error(post(client, MEMBER, files), status)
    good = post(client, MEMBER, [(ANT.name, ANT.read_bytes())])
    assert good.status_code == 200 and good.json()[0]["image"] == ANT.name


@pytest.mark.slow
def test_a_body_streamed_without_length_is_cut_at_the_limit(client) -> None:
    head = b'--b\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    chunks = (head if i == 0 else b"x" * 100_000 for i in range(30))  # 3 MB, no Content-Length: counted as it arrives
    response = client.post(
        f"/api/runs/{MEMBER}/predict", content=chunks, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert "limit" in one_line_error(response, 413)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/api/runs/..%2F..%2Fetc/predict", 400),
        ("/api/runs/%2Fetc/predict", 400),
        ("/api/runs/bench%2F..%2F..%2Fetc/predict", 400),
        ("/api/runs/nothing/predict", 404),
        ("/api/runs/live/predict", 409),  # no checkpoint yet
        (f"/api/runs/{MEMBER}/predict?model=..%2Fmodel.onnx", 400),
        (f"/api/runs/{MEMBER}/predict?model=missing.onnx", 400),
        (f"/api/runs/{MEMBER}/predict?k=0", 422),
    ],
)
def test_bad_names_and_parameters_are_refused(client, url: str, status: int) -> None:
    one_line_error(client.post(url, files=[("images", (ANT.name, ANT.read_bytes()))]), status)


@pytest.mark.slow
def test_missing_field_and_unknown_pages_are_one_line_errors(client) -> None:
    assert "images" in one_line_error(client.post(f"/api/runs/{MEMBER}/predict"), 422)
    one_line_error(client.get("/runs/../../etc/passwd"), 404)
    one_line_error(client.get("/files/..%2F..%2Fetc/passwd"), 400)
    one_line_error(client.get(f"/files/{MEMBER}/config.yaml"), 404)  # only the plots are served
    assert client.get("/docs").status_code == 200
    assert "/api/runs/{name}/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.slow
def test_pages_show_runs_reports_benchmarks_and_review(client) -> None:
    index = client.get("/").text
    assert all(f'href="/runs/{n}"' in index for n in (MEMBER, "live")) and 'href="/benchmarks/bench"' in index
    run = client.get(f"/runs/{MEMBER}").text
    for part in ("curves.png", "confusion_matrix.png", "augmentations.png", 'id="per-class"', "fine_tune_epochs: 1"):
        assert part in run
    assert 'data-status="training"' in client.get("/runs/live").text
    bench = client.get("/benchmarks/bench").text
    assert "comparison.png" in bench and f'href="/runs/{MEMBER}"' in bench
    assert client.get(f"/files/{MEMBER}/curves.png").headers["content-type"] == "image/png"
    review = client.get(f"/runs/{MEMBER}/review").text
    assert review.count('class="case"') >= 6 and review.count("data:image/png;base64,") >= 12


@pytest.mark.slow
def test_predict_from_an_exported_onnx_model_matches_the_run(client, runs) -> None:
    from transferlab.export import export_run

    export_run(runs / MEMBER, "onnx", None, False, False)
    files = [(ANT.name, ANT.read_bytes()), (BEE.name, BEE.read_bytes())]
    from_run = post(client, MEMBER, files).json()
    from_onnx = post(client, MEMBER, files, model="model.onnx").json()
    assert [r["top"][0]["label"] for r in from_onnx] == [r["top"][0]["label"] for r in from_run]
    for a, b in zip(from_onnx, from_run):
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4


@pytest.mark.slow
def test_review_command_writes_review_png_and_a_report_section(runs) -> None:
    run = runs / MEMBER
    for _ in range(2):
        result = run_cli("review", run, "--count", "3")
        assert result.returncode == 0, result.stderr
    assert "highest loss:" in result.stdout and "label doubts:" in result.stdout
    with Image.open(run / "review.png") as im:
        assert im.width > 400 and im.height > 200
    report = (run / "report.md").read_text()
    assert report.count("## Review") == 1 and "![review](review.png)" in report
    assert report.index("## Learning curves") < report.index("## Review")
    assert report.split("### Highest loss")[1].split("### Label doubts")[0].count("| val/") == 3


# --- a real server on 127.0.0.1 and a real browser ---------------------------------------------


@pytest.fixture(scope="module")
def server(app):
    """The app on uvicorn, on a free port of 127.0.0.1, in a thread."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_concurrent_requests_share_one_model_and_agree(server, app) -> None:
    import httpx

    def one(i: int):
        image = ANT if i % 2 else BEE
        files = [("images", (image.name, image.read_bytes()))]
        return httpx.post(f"{server}/api/runs/{MEMBER}/predict", files=files, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(24)))
    assert all(a.status_code == 200 for a in answers)
    assert len({json.dumps(a.json()) for a in answers}) == 2  # one answer per image, whatever the interleaving
    assert len(app.state.models._values) <= 2  # the run's checkpoint (and the ONNX export if that test ran)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    yield page
    page.close()


def loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


@pytest.mark.slow
def test_browser_predict_page_shows_the_label_and_its_bar(server, page, client, tmp_path: Path) -> None:
    page.goto(f"{server}/runs/{MEMBER}/predict")
    page.set_input_files("#files", str(ANT))
    page.wait_for_selector(".result .row", timeout=30_000)
    page.screenshot(path=str(tmp_path / "predict.png"), full_page=True)
    expected = post(client, MEMBER, [(ANT.name, ANT.read_bytes())], k=2).json()[0]["top"][0]
    first = page.locator(".result .row").first
    assert first.locator(".label").inner_text() == expected["label"]
    assert first.locator(".prob").inner_text() == f"{100 * expected['prob']:.1f}%"
    track = page.eval_on_selector(".result .row .track", "e => e.getBoundingClientRect().width")
    bar = page.eval_on_selector(".result .row .bar", "e => e.getBoundingClientRect().width")
    assert bar / track == pytest.approx(expected["prob"], abs=0.01)
    page.set_input_files("#files", {"name": "notes.txt", "mimeType": "image/png", "buffer": b"not pixels"})
    page.wait_for_selector(".message.error", timeout=30_000)
    assert "not a readable image" in page.inner_text("#message")


@pytest.mark.slow
def test_browser_run_page_loads_its_curves(server, page, tmp_path: Path) -> None:
    page.goto(f"{server}/runs/{MEMBER}")
    page.wait_for_load_state("load")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    assert loaded(page, "#curves")
    assert page.eval_on_selector("#curves", "img => img.naturalWidth") > 500


@pytest.mark.slow
def test_browser_runs_benchmark_and_review_pages_load(server, page, tmp_path: Path) -> None:
    page.goto(server)
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
    assert page.locator("#runs tbody tr").count() == 3
    for name, url, count in [("benchmark", "/benchmarks/bench", 1), ("review", f"/runs/{MEMBER}/review", 12)]:
        page.goto(server + url)
        page.wait_for_load_state("load")
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        assert page.locator("img").count() >= count
        assert page.eval_on_selector_all("img", "all => all.every(i => i.complete && i.naturalWidth > 0)"), name


@pytest.mark.slow
def test_browser_run_in_training_refreshes_its_progress_and_curves(server, page, runs, tmp_path: Path) -> None:
    live = runs / "live"
    page.goto(f"{server}/runs/live")
    assert "epoch 1 of 2" in page.inner_text("#status")
    before = page.get_attribute("#curves", "src")
    shutil.copy(runs / MEMBER / "history.csv", live / "history.csv")  # the second epoch arrives
    shutil.copy(runs / MEMBER / "confusion_matrix.png", live / "curves.png")  # and curves.png is redrawn
    page.wait_for_function("document.querySelector('#status').innerText.includes('epoch 2 of 2')", timeout=15_000)
    page.wait_for_function(f"document.querySelector('#curves').getAttribute('src') !== {before!r}", timeout=15_000)
    assert loaded(page, "#curves")
    page.screenshot(path=str(tmp_path / "live.png"), full_page=True)


@pytest.mark.slow
def test_serve_command_warns_when_not_bound_to_this_machine_only(runs) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", "serve", str(runs), "--host", "0.0.0.0", "--port", "0"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    assert first.startswith("warning: serving on 0.0.0.0: anyone who can reach this machine")
    missing = run_cli("serve", runs / "nothing")
    assert missing.returncode == 2 and missing.stderr.startswith("error: runs folder not found")
