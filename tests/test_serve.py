"""`transferlab serve` and `transferlab review`: the API with good and bad uploads, the pages, and a real browser.

One real benchmark of one tiny run (64 px, one epoch of each phase) in a runs folder, beside a copy
of that run without metrics.json, as a run still training looks. The browser is Debian's chromium,
driven by Playwright's Python API (no browser download).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import DATASETS, ROOT, make_subset, run_cli
from PIL import Image

from transferlab.inference.review import rank, with_section
from transferlab.serve.catalog import BadName, resolve

ANT = DATASETS / "hymenoptera" / "val" / "ants" / "10308379_1b6c72e180.jpg"
BEE = DATASETS / "hymenoptera" / "val" / "bees" / "1032546534_06907fe3b3.jpg"
MEMBER = "bench/efficientnet_lite0"
LIMITS = dict(max_files=3, max_file_bytes=400_000, max_body_bytes=1_000_000)
BASE = "http://127.0.0.1:8000"  # the test client's Host: the server answers only this machine's names
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP attacker.test 127.0.0.1",  # a name an attacker points at this machine (DNS rebinding)
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
    first_epoch = (live / "history.csv").read_text().splitlines()[:3]  # the header, the head's epoch 0, epoch 1
    (live / "history.csv").write_text("\n".join(first_epoch) + "\n")
    return root


@pytest.fixture(scope="module")
def app(runs):
    from transferlab.serve.app import create_app

    return create_app(runs, **LIMITS)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, base_url=BASE) as c:
        yield c


def post(client, name: str, files: list[tuple[str, bytes]], **params):
    return client.post(f"/api/runs/{name}/predict", params=params, files=[("images", f) for f in files])


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


@pytest.mark.slow
def test_api_runs_lists_runs_benchmarks_and_a_run_in_training(client, runs) -> None:
    entries = {e["name"]: e for e in client.get("/api/runs").json()}
    assert set(entries) == {"bench", MEMBER, "live"}
    run = entries[MEMBER]
    assert run["kind"] == "run" and run["backbone"] == "efficientnet_lite0" and run["status"] == "finished"
    assert run["classes"] == ["ants", "bees"] and run["epochs_total"] == 2
    # the run's own record: its metrics, and the best epoch of its history
    history = list(csv.DictReader((runs / MEMBER / "history.csv").read_text().splitlines()))
    best = max(float(r["val_accuracy"]) for r in history)
    assert run["best_val_accuracy"] == json.loads((runs / MEMBER / "metrics.json").read_text())["best_val_accuracy"]
    assert run["best_val_accuracy"] == pytest.approx(best, abs=1e-6)
    assert entries["bench"]["kind"] == "benchmark" and entries["bench"]["status"] == "finished"
    assert entries["live"]["status"] == "training" and entries["live"]["epoch"] == 1
    detail = client.get(f"/api/runs/{MEMBER}").json()
    assert [h["phase"] for h in detail["history"]] == ["head", "feature_extraction", "fine_tune"]
    assert detail["evaluation"]["num_images"] == 20


@pytest.mark.slow
def test_predict_answers_what_predict_format_json_prints(client, runs) -> None:
    from transferlab.inference.predictor import open_predictor, predict, render

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
    first = client.get(f"/runs/{MEMBER}/review").text  # answered at once, the review computing in the background
    assert 'id="review-work"' in first and "Computing the review" in first
    assert ready(client, MEMBER)["state"] == "ready"
    review = client.get(f"/runs/{MEMBER}/review").text
    assert review.count('class="case"') >= 6 and review.count("data:image/png;base64,") >= 12


def ready(client, name: str, seconds: float = 120) -> dict:
    """The review's state once it is no longer working, polled as the page does, every step seen on the way."""
    deadline, steps = time.monotonic() + seconds, set()
    while (state := client.get(f"/api/runs/{name}/review").json())["state"] == "working":
        steps.add(state["step"])
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    return {**state, "steps": steps}


@pytest.mark.slow
def test_predict_from_an_exported_onnx_model_matches_the_run(client, runs) -> None:
    from transferlab.inference.export import export_run

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


@contextmanager
def serving(app):
    """``app`` on uvicorn, on a free port of 127.0.0.1, in a thread: its URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(app):
    with serving(app) as url:
        yield url


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
        if name == "review":  # it says what it computes, then shows itself
            page.wait_for_selector(".case img", timeout=120_000)
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


# --- nothing leaks, one damaged run breaks nothing (issue 21) ----------------------------------

SECRET = "SECRET-3f9c1a outside the runs folder"
OUTSIDE = json.dumps({"accuracy": 0.5, "num_images": 1, "per_class": {}, "best_val_accuracy": 0.5, "note": SECRET})


def copy_run(runs: Path, dest: Path) -> Path:
    """A copy of the real run (its best checkpoint, not the rest of the checkpoints or exports)."""
    ignore = shutil.ignore_patterns("cache", "lightning_logs", "last.ckpt", "*.onnx", "*.pt", "*.data")
    return Path(shutil.copytree(runs / MEMBER, dest, symlinks=True, ignore=ignore))


def good_still_served(client, name: str = "good") -> None:
    assert client.get(f"/api/runs/{name}").json()["status"] == "finished"
    assert client.get(f"/runs/{name}").status_code == 200
    image = client.get(f"/files/{name}/curves.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def answers(client, name: str) -> list:
    """Every answer the app gives about run ``name``, pages and API, plot, predict and review."""
    files = [("images", (ANT.name, ANT.read_bytes()))]
    gets = ["/", "/api/runs", f"/api/runs/{name}", f"/runs/{name}", f"/runs/{name}/predict", f"/runs/{name}/review"]
    gets += [f"/files/{name}/{f}" for f in ("curves.png", "confusion_matrix.png")]
    return [client.get(url) for url in gets] + [client.post(f"/api/runs/{name}/predict", files=files)]


LINKS = ["curves.png", "evaluation.json", "config.yaml", "history.csv", "metrics.json", "checkpoints/best.ckpt"]
LINKS += ["model.pt", "the run folder", "a folder above the run"]


@pytest.mark.slow
@pytest.mark.parametrize("link", LINKS)
def test_symlinks_out_of_a_run_are_never_followed(runs, tmp_path: Path, link: str) -> None:
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    root, outside = tmp_path / "runs", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(OUTSIDE)
    copy_run(runs, root / "good")
    if link == "the run folder":
        (root / "evil").symlink_to(copy_run(runs, outside / "run"))
        (outside / "run" / "config.yaml").write_text((outside / "run" / "config.yaml").read_text() + f"# {SECRET}\n")
        name = "evil"
    elif link == "a folder above the run":
        copy_run(runs, outside / "group" / "evil")
        (root / "group").symlink_to(outside / "group")
        name = "group/evil"
    else:
        name = "evil"
        target = copy_run(runs, root / "evil") / link
        if link == "checkpoints/best.ckpt":  # a real checkpoint, but not the run's own: predict must not load it
            shutil.copy(target, outside / "secret.txt")
        target.unlink(missing_ok=True)
        target.symlink_to(outside / "secret.txt")
    with TestClient(create_app(root), base_url=BASE) as client:
        for answer in answers(client, name):
            assert SECRET not in answer.text, answer.request.url
            if answer.request.url.path not in ("/", "/api/runs"):  # the run's own pages, plots, predict and review
                one_line_error(answer, 409)
        listed = {e["name"]: e for e in client.get("/api/runs").json()}
        link_name = "group" if link == "a folder above the run" else name
        assert listed[link_name]["status"] == "damaged" and "symbolic link" in listed[link_name]["reason"], listed
        assert "symbolic link" in one_line_error(client.get(f"/api/runs/{name}"), 409)
        assert "damaged" in client.get("/").text
        good_still_served(client)


DAMAGE = {
    "empty config.yaml": ("config.yaml", "", "empty"),
    "list-valued config.yaml": ("config.yaml", "- a\n- b\n", "a list"),
    "truncated history.csv": ("history.csv", None, "truncated"),
    "metrics.json of one brace": ("metrics.json", "{", "does not parse"),
    "config.yaml that does not parse": ("config.yaml", "spec: [\n", "does not parse"),
    "evaluation.json of another shape": ("evaluation.json", '{"accuracy": "high"}', "not an evaluation"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_is_listed_as_damaged_and_the_others_are_served(runs, tmp_path: Path, case: str) -> None:
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    file, content, words = DAMAGE[case]
    root = tmp_path / "runs"
    copy_run(runs, root / "good")
    bad = copy_run(runs, root / "bad")
    if content is None:  # cut inside the last row, as a crash or a full disk leaves it
        content = (bad / file).read_text()[:-12]
    (bad / file).write_text(content)
    with TestClient(create_app(root), base_url=BASE) as client:
        listed = {e["name"]: e for e in client.get("/api/runs").json()}
        assert listed["bad"]["status"] == "damaged" and words in listed["bad"]["reason"]
        assert "\n" not in listed["bad"]["reason"] and listed["good"]["status"] == "finished"
        index = client.get("/")
        assert index.status_code == 200 and words in index.text and 'href="/runs/good"' in index.text
        for url in ("/api/runs/bad", "/runs/bad", "/runs/bad/predict", "/runs/bad/review"):
            assert words in one_line_error(client.get(url), 409), url
        predict = client.post("/api/runs/bad/predict", files=[("images", (ANT.name, ANT.read_bytes()))])
        assert words in one_line_error(predict, 409)
        good_still_served(client)


@pytest.mark.slow
@pytest.mark.parametrize("leaderboard", ["{", "[1, 2]", '{"model": "x"}'])
def test_a_bad_leaderboard_is_a_damaged_benchmark(runs, tmp_path: Path, leaderboard: str) -> None:
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    root = tmp_path / "runs"
    copy_run(runs, root / "good")
    (root / "bench").mkdir()
    (root / "bench" / "leaderboard.json").write_text(leaderboard)
    with TestClient(create_app(root), base_url=BASE) as client:
        listed = {e["name"]: e for e in client.get("/api/runs").json()}
        assert listed["bench"]["status"] == "damaged" and "leaderboard.json" in listed["bench"]["reason"]
        assert "leaderboard.json" in one_line_error(client.get("/benchmarks/bench"), 409)
        assert client.get("/").status_code == 200
        good_still_served(client)


@contextmanager
def serving_as_nobody(app, warm: list[str]):
    """``app`` in a forked process that has dropped root for nobody, as another user would serve the folder.

    Root reads every file, so as root this is the only way to meet a real PermissionError. The child
    cannot import from root's Python after that: every route it answers has run once here first.
    """
    import socket

    import uvicorn
    from fastapi.testclient import TestClient

    with TestClient(app, base_url=BASE) as client:
        assert all(client.get(url).status_code == 200 for url in warm)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="critical")
    config.load()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            os._exit(0)
    port = sock.getsockname()[1]
    sock.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


@pytest.mark.slow
def test_a_run_the_server_cannot_read_is_damaged_and_its_plot_never_a_200(runs) -> None:
    import tempfile

    import httpx

    from transferlab.serve.app import create_app

    root = Path(tempfile.mkdtemp(prefix="serve-perm-")) / "runs"  # outside pytest's 0700 folders: nobody reads it
    try:
        copy_run(runs, root / "good")
        copy_run(runs, root / "private")
        subprocess.run(["chmod", "-R", "a+rX", str(root.parent)], check=True)
        for f in ("config.yaml", "curves.png"):
            (root / "private" / f).chmod(0o600 if os.geteuid() == 0 else 0)  # others (nobody) cannot read them
        app = create_app(root)
        warm = ["/api/runs", "/", "/runs/good", "/files/good/curves.png", "/api/runs/good"]
        with serving_as_nobody(app, warm) if os.geteuid() == 0 else serving(app) as url:
            listed = {e["name"]: e for e in httpx.get(f"{url}/api/runs").json()}
            assert listed["private"]["status"] == "damaged" and "permission denied" in listed["private"]["reason"]
            assert listed["good"]["status"] == "finished" and httpx.get(url).status_code == 200
            for path in ("/runs/private", "/files/private/curves.png", "/api/runs/private"):
                assert "permission denied" in one_line_error(httpx.get(url + path), 409)
            plot = httpx.get(f"{url}/files/good/curves.png")
            assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    finally:
        shutil.rmtree(root.parent)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["attacker.example.com", "attacker.test:8000", "127.0.0.1.attacker.test", ""])
def test_only_this_machines_names_are_answered(app, runs, host: str) -> None:
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    with TestClient(app, base_url=BASE) as client:
        for url in ("/api/runs", "/", f"/files/{MEMBER}/curves.png"):
            assert "answers only" in one_line_error(client.get(url, headers={"Host": host}), 400)
        for good in ("127.0.0.1", "127.0.0.1:18931", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/api/runs", headers={"Host": good}).status_code == 200, good
    with TestClient(create_app(runs, host="192.168.7.7"), base_url=BASE) as client:  # --host names another address
        assert client.get("/api/runs", headers={"Host": "192.168.7.7:8000"}).status_code == 200
        one_line_error(client.get("/api/runs", headers={"Host": host}), 400)
    with TestClient(create_app(runs, host="0.0.0.0"), base_url=BASE) as client:  # served to the network, with a warning
        assert client.get("/api/runs", headers={"Host": host or "x"}).status_code == 200


def fetch_headers(site: str, mode: str = "cors", dest: str = "empty") -> dict:
    return {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest}


@pytest.mark.slow
def test_requests_from_another_site_that_start_work_are_refused(client) -> None:
    files = [("images", (ANT.name, ANT.read_bytes()))]
    url = f"/api/runs/{MEMBER}/predict"
    for origin in ("http://attacker.test", "http://127.0.0.1:9999", "null"):
        assert "refused" in one_line_error(client.post(url, files=files, headers={"Origin": origin}), 403)
    for site in ("cross-site", "same-site"):  # same-site: another port of this machine
        refused = [
            client.post(url, files=files, headers=fetch_headers(site, "no-cors")),
            client.get(f"/runs/{MEMBER}/review", headers=fetch_headers(site, "no-cors", "image")),
            client.get(f"/runs/{MEMBER}/review", headers=fetch_headers(site, "navigate", "document")),
            client.get(f"/runs/{MEMBER}", headers=fetch_headers(site, "navigate", "iframe")),
            client.get("/api/runs", headers=fetch_headers(site)),
            client.get(f"/files/{MEMBER}/curves.png", headers=fetch_headers(site, "no-cors", "image")),
        ]
        assert all("another site" in one_line_error(r, 403) for r in refused)
        # a link from elsewhere still opens a page that starts no work
        assert client.get(f"/runs/{MEMBER}", headers=fetch_headers(site, "navigate", "document")).status_code == 200
    same = client.post(url, files=files, headers={"Origin": BASE, **fetch_headers("same-origin")})
    assert same.status_code == 200 and same.json()[0]["image"] == ANT.name
    assert client.post(url, files=files).status_code == 200  # curl and scripts send neither header


ODD = "ants & bees #1? ü"


@pytest.fixture(scope="module")
def odd_runs(runs, tmp_path_factory) -> Path:
    """A runs folder with a run whose name needs URL encoding, and a plain one."""
    root = tmp_path_factory.mktemp("odd") / "runs"
    copy_run(runs, root / ODD)
    copy_run(runs, root / "good")
    return root


@pytest.mark.slow
def test_names_with_hash_question_mark_and_unicode_give_working_links(odd_runs) -> None:
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    encoded = quote(ODD)
    with TestClient(create_app(odd_runs), base_url=BASE) as client:
        index = client.get("/").text
        assert f'href="/runs/{encoded}"' in index and f'href="/runs/{encoded}/predict"' in index
        run = client.get(f"/runs/{encoded}")
        assert run.status_code == 200 and f'src="/files/{encoded}/curves.png?v=' in run.text
        assert client.get(f"/files/{encoded}/curves.png").content.startswith(b"\x89PNG")
        assert client.get(f"/api/runs/{encoded}").json()["name"] == ODD
        good_still_served(client)


@pytest.mark.slow
def test_a_very_long_name_is_a_one_line_400(client) -> None:
    for url in ("/api/runs/{}", "/runs/{}", "/files/{}/curves.png", "/runs/{}/predict"):
        assert "too long" in one_line_error(client.get(url.format("a" * 20_000)), 400)
        assert "too long" in one_line_error(client.get(url.format("b/" + "a" * 300)), 400)
    assert client.get(f"/api/runs/{MEMBER}").status_code == 200


@pytest.mark.slow
def test_docs_work_offline_and_list_the_api(client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/runs/{name}/predict" in docs.text
    assert "://" not in docs.text.replace("http://127.0.0.1:8000", "")  # nothing from elsewhere: no CDN
    assert "/api/runs/{name}/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.slow
def test_serve_on_a_busy_port_fails_in_one_line_before_serving(runs) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", runs, "--port", port, timeout=60)
    assert result.returncode == 2 and "serving" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: port {port} on 127.0.0.1 is in use: ") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_browser_a_rebinding_name_cannot_read_the_server(server, page) -> None:
    port = server.rsplit(":", 1)[1]
    answer = page.goto(f"http://attacker.test:{port}/api/runs")
    assert answer.status == 400 and "answers only" in page.inner_text("body") and "efficientnet" not in page.content()
    page.goto(f"http://attacker.test:{port}/")  # the attacker's page, now at this server's address
    read = page.evaluate("fetch('/api/runs').then(async r => [r.status, await r.text()])")
    assert read[0] == 400 and "efficientnet" not in read[1]
    page.goto(f"{server}/api/runs")  # the same request under this machine's own name
    assert "efficientnet_lite0" in page.inner_text("body")


ATTACK = """async ([server, name, bytes]) => {
  const body = new FormData();
  body.append("images", new Blob([new Uint8Array(bytes)], {type: "image/jpeg"}), "ant.jpg");
  for (let i = 0; i < 3; i++) {
    await fetch(`${server}/api/runs/${encodeURIComponent(name)}/predict`, {method: "POST", mode: "no-cors", body})
      .catch(() => null);
  }
  const img = document.createElement("img");
  img.src = `${server}/runs/${encodeURIComponent(name)}/review`;
  document.body.append(img);
  await new Promise((done) => { img.onload = img.onerror = done; });
}"""


@pytest.fixture
def other_site():
    """A tiny web server on another port of 127.0.0.1: the attacker's origin."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title><p>nothing to see</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def recording(app, answered: list):
    """``app``, noting the path and status of every answer it sends."""

    async def recorded(scope, receive, send):
        async def sending(message):
            if message["type"] == "http.response.start":
                answered.append((scope["path"], message["status"]))
            await send(message)

        await app(scope, receive, sending)

    return recorded


@pytest.mark.slow
@pytest.mark.parametrize("site", ["127.0.0.1", "attacker.test"])
def test_browser_another_site_cannot_predict_or_start_a_review(odd_runs, page, other_site, monkeypatch, site) -> None:
    from urllib.parse import quote

    import transferlab.inference.predictor
    import transferlab.inference.review
    from transferlab.serve.app import create_app

    work = {"predict": 0, "review": 0}

    def counted(key: str, fn):
        def call(*args, **kwargs):
            work[key] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(
        transferlab.inference.predictor, "predict", counted("predict", transferlab.inference.predictor.predict)
    )
    monkeypatch.setattr(
        transferlab.inference.review, "review_run", counted("review", transferlab.inference.review.review_run)
    )
    answered = []  # what the server answered, as it sent it (the browser hides an <img>'s blocked answer)
    with serving(recording(create_app(odd_runs), answered)) as server:
        page.goto(f"http://{site}:{other_site}/")
        page.evaluate(ATTACK, [server, ODD, list(ANT.read_bytes())])
        assert answered == [(f"/api/runs/{ODD}/predict", 403)] * 3 + [(f"/runs/{ODD}/review", 403)]
        assert work == {"predict": 0, "review": 0}
        page.goto(f"{server}/runs/{quote(ODD)}/predict")  # the server's own page: the same request works
        page.set_input_files("#files", str(ANT))
        page.wait_for_selector(".result .row", timeout=30_000)
        assert work["predict"] == 1 and page.inner_text(".result h3") == ANT.name
        assert answered[-1] == (f"/api/runs/{ODD}/predict", 200)
