"""The project page (serve/projects.py, serve/jobs.py, serve/studio.py): a dataset made in the browser, trained in the
queue, followed live, cancelled and resumed; every refusal followed by a good request that still works.

Real images from the shared datasets, real training at 64 px; the browser is Debian's chromium with its fake camera.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import DATASETS, run_cli
from PIL import Image
from test_serve import BASE, CHROMIUM, CHROMIUM_ARGS, one_line_error, serving

ANTS = sorted((DATASETS / "hymenoptera" / "train" / "ants").glob("*.jpg"))
BEES = sorted((DATASETS / "hymenoptera" / "train" / "bees").glob("*.jpg"))
LIMITS = dict(max_files=4, max_file_bytes=300_000, max_body_bytes=1_000_000, max_pixels=1_000_000, max_images=30)


def jpeg(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def small(path: Path, side: int = 200) -> tuple[str, bytes]:
    """A real photo, shrunk to stay under the test's byte limit."""
    with Image.open(path) as im:
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=90)
    return path.name, buf.getvalue()


def bomb() -> bytes:
    """A 300-byte PNG that declares 30,000 x 30,000 pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


def noise_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


@pytest.fixture
def client(tmp_path: Path):
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    with TestClient(create_app(tmp_path, **LIMITS), base_url=BASE) as c:
        c.root = tmp_path
        yield c


def upload(client, klass: str, files: list[tuple[str, bytes]], project: str = "bugs", **headers):
    return client.post(
        f"/api/projects/{project}/classes/{klass}/images", files=[("images", f) for f in files], headers=headers
    )


def good_upload_works(client, project: str = "bugs") -> None:
    before = client.get(f"/api/projects/{project}").json()["counts"]["ants"]
    answer = upload(client, "ants", [small(ANTS[9])], project)
    assert answer.status_code == 201, answer.text
    assert answer.json()["counts"]["ants"] == before + 1


def test_a_project_is_an_ordinary_class_folder_the_cli_reads(client) -> None:
    from transferlab.data.labels import index_data

    made = client.post("/api/projects", json={"name": "bugs", "classes": ["ants", "bees", "Käfer 2"]})
    assert made.status_code == 201 and list(made.json()["classes"]) == ["Käfer 2", "ants", "bees"]
    stored = upload(client, "ants", [small(p) for p in ANTS[:3]]).json()["stored"]
    assert stored == [p.name for p in ANTS[:3]]
    upload(client, "bees", [small(p) for p in BEES[:3]])
    folder = client.root / "projects" / "bugs"
    assert sorted(f.name for f in (folder / "ants").iterdir()) == sorted(stored)  # no temporary file left
    shown = client.get(f"/project-files/bugs/ants/{stored[0]}")
    assert shown.content == (folder / "ants" / stored[0]).read_bytes() and shown.headers["content-type"] == "image/jpeg"
    assert shown.headers["x-content-type-options"] == "nosniff"
    # the same name again is stored beside it, never over it
    again = upload(client, "ants", [small(ANTS[0], side=100)]).json()["stored"]
    assert again == [f"{ANTS[0].stem}-2.jpg"] and (folder / "ants" / stored[0]).read_bytes() == small(ANTS[0])[1]
    assert client.delete(f"/api/projects/bugs/classes/ants/images/{again[0]}").json()["counts"]["ants"] == 3
    # rename, never onto another class (any letter case); delete
    assert "has a class" in one_line_error(
        client.post("/api/projects/bugs/classes/bees/rename", json={"to": "ANTS"}), 409
    )
    renamed = client.post("/api/projects/bugs/classes/bees/rename", json={"to": "wasps"}).json()
    assert renamed["counts"] == {"Käfer 2": 0, "ants": 3, "wasps": 3}
    assert client.delete("/api/projects/bugs/classes/K%C3%A4fer%202").json()["counts"] == {"ants": 3, "wasps": 3}
    # what train reads: the same classes and images
    table = index_data(folder, 0.34, 0)
    assert table.classes == ["ants", "wasps"] and len(table.train) + len(table.val) == 6
    assert [p["name"] for p in client.get("/api/projects").json()] == ["bugs"]
    assert client.get("/api/runs").json() == []  # a project is not a run
    page = client.get("/projects/bugs").text
    assert 'id="project"' in page and "efficientnet_lite0" in page


REFUSALS = {
    "project name out of the folder": ("new", {"name": "../evil", "classes": ["a"]}, 400, "bad project name"),
    "hidden project name": ("new", {"name": ".hidden", "classes": ["a"]}, 400, "bad project name"),
    "class with a slash": ("new", {"name": "other", "classes": ["a/b"]}, 400, "bad class name"),
    "class named ..": ("class", {"name": ".."}, 400, "bad class name"),
    "a project that exists": ("new", {"name": "BUGS", "classes": ["a"]}, 409, "exists"),
    "a class that exists": ("class", {"name": "Ants"}, 409, "has a class"),
    "too many files": ("upload", [small(p) for p in ANTS[:5]], 413, "at most 4"),
    "a file over the byte limit": ("upload", [jpeg(max(ANTS, key=lambda p: p.stat().st_size))], 413, "MiB"),
    "a body over the limit": ("upload", [("a.png", noise_png(310, 310))] * 4, 413, "request body"),
    "too many pixels": ("upload", [("wide.png", noise_png(1500, 700)[:290_000])], 413, "1500x700 pixels"),
    "a decompression bomb": ("upload", [("bomb.png", bomb())], 413, "decompression bomb"),
    "not an image": ("upload", [("notes.jpg", b"<html><script>alert(1)</script></html>")], 400, "not a readable image"),
    "a truncated image": ("upload", [("cut.jpg", small(ANTS[1])[1][:3000])], 400, "not a readable image"),
    "a class that is not there": ("upload-to", "moths", 404, "no class"),
    "another site's upload": ("origin", "http://attacker.test", 403, "refused"),
    "an image name out of the class": ("delete", "..%2F..%2Fconfig.yaml", 404, ""),
    "another site deleting a class": ("delete-class", "http://127.0.0.1:9999", 403, "refused"),
    "another site reading the queue": ("events", "cross-site", 403, "another site"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_4xx_and_a_good_request_still_works(client, case: str) -> None:
    client.post("/api/projects", json={"name": "bugs", "classes": ["ants", "bees"]})
    kind, value, status, words = REFUSALS[case]
    if kind == "new":
        answer = client.post("/api/projects", json=value)
    elif kind == "class":
        answer = client.post("/api/projects/bugs/classes", json=value)
    elif kind == "upload-to":
        answer = upload(client, value, [small(ANTS[0])])
    elif kind == "origin":
        answer = upload(client, "ants", [small(ANTS[0])], Origin=value)
    elif kind == "delete":
        answer = client.delete(f"/api/projects/bugs/classes/ants/images/{value}")
    elif kind == "delete-class":
        answer = client.delete("/api/projects/bugs/classes/ants", headers={"Origin": value})
    elif kind == "events":
        answer = client.get("/api/jobs/events", headers={"Sec-Fetch-Site": value, "Sec-Fetch-Mode": "cors"})
    else:
        answer = upload(client, "ants", value)
    assert words in one_line_error(answer, status)
    held = client.get("/api/projects/bugs").json()
    assert held["counts"] == {"ants": 0, "bees": 0} and [p.name for p in client.root.iterdir()] == ["projects"]
    assert sorted(p.name for p in (client.root / "projects").iterdir()) == ["bugs"]
    good_upload_works(client)


def test_the_image_limit_of_a_project_and_a_linked_class_folder(client, tmp_path_factory) -> None:
    client.post("/api/projects", json={"name": "bugs", "classes": ["ants", "bees"]})
    for i in range(0, 28, 4):
        assert upload(client, "bees", [small(p, 64) for p in BEES[i : i + 4]]).status_code == 201
    assert "limit of 30" in one_line_error(upload(client, "bees", [small(p, 64) for p in BEES[40:43]]), 413)
    good_upload_works(client)
    outside = tmp_path_factory.mktemp("outside")
    (client.root / "projects" / "bugs" / "wasps").symlink_to(outside)  # a class that leads out of the served folder
    assert "no class" in one_line_error(upload(client, "wasps", [small(ANTS[0])]), 404)  # a link is no class
    assert list(outside.iterdir()) == [] and "wasps" not in client.get("/api/projects/bugs").json()["classes"]
    good_upload_works(client)


def test_training_needs_two_classes_with_images(client) -> None:
    client.post("/api/projects", json={"name": "bugs", "classes": ["ants", "bees"]})
    upload(client, "ants", [small(p) for p in ANTS[:3]])
    assert "two classes" in one_line_error(client.post("/api/projects/bugs/train", json={"budget_s": 30}), 400)
    assert "budget_s" in one_line_error(client.post("/api/projects/bugs/train", json={"budget_s": 5}), 422)
    assert client.get("/api/jobs").json() == []


def wait_for(check, seconds: float = 300, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


@pytest.mark.slow
def test_a_cancelled_run_says_so_and_resumes_from_its_last_checkpoint(client) -> None:
    """A job killed in its fine-tuning epochs: stopped.json, the runs page says cancelled; resumed, it goes on."""
    client.post("/api/projects", json={"name": "bugs", "classes": ["ants", "bees"]})
    for i in range(0, 12, 4):
        upload(client, "ants", [small(p, 96) for p in ANTS[i : i + 4]])
        upload(client, "bees", [small(p, 96) for p in BEES[i : i + 4]])
    jobs, data, run = client.app.state.jobs, client.root / "projects" / "bugs", client.root / "long"
    args = ["train", str(data), "--out", str(run), "--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "40",
            "--patience", "0", "--workers", "0"]  # fmt: skip
    job = jobs.submit("train", "long", args, project="bugs")
    assert "is training" in one_line_error(upload(client, "ants", [small(ANTS[20])]), 409)  # not under a run
    history = run / "history.csv"
    wait_for(
        lambda: history.exists() and "fine_tune" in history.read_text() and (run / "checkpoints/last.ckpt").exists()
    )
    assert client.post(f"/api/jobs/{job.id}/cancel").status_code == 200
    assert job.state == "cancelled"
    stopped = json.loads((run / "stopped.json").read_text())
    assert stopped["status"] == "cancelled" and stopped["job"] == job.id
    listed = {r["name"]: r for r in client.get("/api/runs").json()}
    assert listed["long"]["status"] == "cancelled" and 'class="status cancelled"' in client.get("/").text
    rows_before = len(history.read_text().splitlines()) - 1
    resumed = client.post("/api/runs/long/resume").json()
    assert resumed["kind"] == "resume"
    assert "queued or training" in one_line_error(client.post("/api/runs/long/resume"), 409)
    wait_for(lambda: jobs.get(resumed["id"]).state not in ("queued", "running"))
    assert jobs.get(resumed["id"]).state == "finished", jobs.get(resumed["id"]).message
    epochs = [int(r.split(",")[0]) for r in history.read_text().splitlines()[1:]]
    assert epochs == list(range(0, 43)) and rows_before < 43  # went on from where it stopped, every epoch once
    assert not (run / "stopped.json").exists() and client.get("/api/runs").json()[0]["status"] == "finished"
    good_upload_works(client)  # the project is free again


# --- the whole flow in a real browser, with Chromium's fake camera ------------------------------


@pytest.fixture
def camera_page(tmp_path: Path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    args = [*CHROMIUM_ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        yield page
        browser.close()


def jobs(page) -> list[dict]:
    return json.loads(page.evaluate("fetch('/api/jobs').then(r => r.text())"))


def choose(page, klass: str, files: list[Path]) -> None:
    card = page.locator(f'section.klass[data-class="{klass}"]')
    card.locator('input[type="file"]:not(.folder)').set_input_files([str(f) for f in files])


def shows(klass: str, n: int) -> str:
    """A script true once the class's card says it holds ``n`` images."""
    return f"document.querySelector('section.klass[data-class=\"{klass}\"] .count').textContent.startsWith('{n} ')"


def count(page, klass: str) -> int:
    text = page.locator(f'section.klass[data-class="{klass}"] .count').inner_text()
    return int(text.split()[0])


@pytest.mark.slow
def test_browser_project_from_files_and_camera_trained_followed_tried_cancelled_and_resumed(
    camera_page, tmp_path: Path
) -> None:
    from transferlab.serve.app import create_app

    page, root = camera_page, tmp_path / "served"
    root.mkdir()
    bees = tmp_path / "bees-folder" / "inner"  # added as a folder, images at any depth
    bees.mkdir(parents=True)
    for p in BEES[:24]:
        (bees / p.name).write_bytes(p.read_bytes())
    # the ants chosen with twelve bees among them, by mistake: the closed-form head alone then gets validation images
    # wrong, and the run trains epochs to follow (a head right on every validation image would end it at epoch 0)
    ants = ANTS[:12] + BEES[24:36]
    (bees / "notes.txt").write_text("not an image: left out")
    with serving(create_app(root)) as server:
        page.goto(f"{server}/projects")
        page.fill("#project-name", "garden")
        page.fill("#project-classes", "ants, bees, camera")
        page.click("#new-project button")
        page.wait_for_selector('section.klass[data-class="camera"]')
        choose(page, "ants", ants)
        page.wait_for_function(shows("ants", 24))
        page.locator('section.klass[data-class="bees"] input.folder').set_input_files(str(bees.parent))
        page.wait_for_function(shows("bees", 24))
        page.click("#camera-start")
        page.wait_for_function("document.getElementById('camera').videoWidth > 0")
        page.select_option("#burst", "10")
        for burst in (1, 2):
            page.click('section.klass[data-class="camera"] .capture')
            page.wait_for_function(shows("camera", 10 * burst))
        assert count(page, "camera") == 20 and count(page, "ants") == 24
        assert len(list((root / "projects" / "garden" / "camera").glob("camera-*.jpg"))) == 20

        # train with a short budget, and follow it: the progress moves, the curves appear
        page.select_option("#image-size", "64")
        page.eval_on_selector("#budget", "b => { b.value = 30; b.dispatchEvent(new Event('input')); }")
        assert page.inner_text("#budget-shown") == "30 s"
        began = time.monotonic()
        page.click("#train-button")
        seen = set()
        while page.get_attribute("#live", "data-state") != "finished":
            assert time.monotonic() - began < 300, page.inner_text("#live")
            assert page.get_attribute("#live", "data-state") in (None, "queued", "running"), page.inner_text("#live")
            seen.add(page.inner_text("#live-progress"))
            time.sleep(0.3)
        trained = time.monotonic() - began
        assert any("epoch" in s for s in seen) and any("left" in s for s in seen) and len(seen) >= 3, seen
        assert int(page.get_attribute("#live-curves", "data-epochs")) >= 2
        assert page.locator("#live-curves polyline.val_accuracy").count() == 1
        run = root / "garden-1"
        assert json.loads((run / "metrics.json").read_text())["best_val_accuracy"] > 0.5

        # try it: the page's answer is predict's
        page.click("#try-it")
        page.set_input_files("#files", str(ANTS[40]))
        page.wait_for_selector(".result .row")
        cli = json.loads(run_cli("predict", ANTS[40], "--run", run, "--format", "json").stdout)[0]
        first = page.locator(".result .row").first
        assert first.locator(".label").inner_text() == cli["top"][0]["label"]
        assert first.locator(".prob").inner_text() == f"{100 * cli['top'][0]['prob']:.1f}%"
        page.click("#live-camera")  # and live, from the camera
        page.wait_for_selector(".result h3:text('camera.jpg')", timeout=60_000)
        page.click("#live-camera")

        # export from the run page, then download it
        page.goto(f"{server}/runs/garden-1")
        page.click('#export button[data-format="onnx"]')
        page.wait_for_selector('#exports a:text("model.onnx")', timeout=180_000)
        with page.expect_download() as download:
            page.click('#exports a:text("model.onnx")')
        assert Path(download.value.path()).read_bytes() == (run / "model.onnx").read_bytes()

        # a second run, and a third behind it in the queue; the third is cancelled waiting, the second running
        page.goto(f"{server}/projects/garden")
        page.select_option("#image-size", "64")
        page.eval_on_selector("#budget", "b => { b.value = 30; b.dispatchEvent(new Event('input')); }")
        page.click("#train-button")
        page.wait_for_selector('#queue tr[data-job="3"][data-state="running"]')
        page.click("#train-button")
        page.wait_for_selector('#queue tr[data-job="4"][data-state="queued"]')
        assert "waiting, #1" in page.inner_text('#queue tr[data-job="4"]')
        page.click('#queue tr[data-job="4"] button.cancel')
        page.wait_for_selector('#queue tr[data-job="4"][data-state="cancelled"]')
        page.click('#queue tr[data-job="3"] button.cancel')
        page.wait_for_selector('#queue tr[data-job="3"][data-state="cancelled"]', timeout=30_000)
        listed = {r["name"]: r["status"] for r in json.loads(page.evaluate("fetch('/api/runs').then(r => r.text())"))}
        assert listed.get("garden-2", "cancelled") == "cancelled"  # a run cancelled before its folder is none at all
        page.click('#queue tr[data-job="3"] button.resume')
        page.wait_for_selector('#queue tr[data-job="5"]')
        resumed = wait_for(
            lambda: next((j for j in jobs(page) if j["id"] == 5 and j["state"] not in ("queued", "running")), None)
        )
        assert resumed["state"] == "finished" and resumed["kind"] == "resume", resumed
        assert (root / "garden-2" / "metrics.json").exists() and not (root / "garden-2" / "stopped.json").exists()
        assert not (root / "garden-3").exists()  # the job cancelled in the queue never ran
    print(f"\n3 classes (24 files, 12 of them bees; a folder of 24; 20 camera frames) to a model: {trained:.0f} s")
