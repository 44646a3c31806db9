"""The project page's flow, timed: a project of N images per class made through the web app's API, trained from it.

Three classes of real shared images (hymenoptera ants and bees, cats_and_dogs_filtered cats) are uploaded to a
new project (``POST /api/projects``, then the class uploads), a training run is queued with the page's options
(``POST /api/projects/NAME/train``) and followed as the page follows it (the queue each second) to the end; the
review page is then opened and waited for. One JSON line: upload, training and review seconds, the first epoch's
time on the page, the run's best validation accuracy.

    .venv/bin/python benchmarks/project_flow.py --per-class 30 --budget 120
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from transferlab.serve.app import create_app

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
CLASSES = {
    "ants": SHARED / "hymenoptera" / "train" / "ants",
    "bees": SHARED / "hymenoptera" / "train" / "bees",
    "cats": SHARED / "cats_and_dogs_filtered" / "train" / "cats",
}


def wait(client: TestClient, url: str, done, every: float = 1.0) -> tuple[dict, list[tuple[float, dict]]]:
    began, seen = time.perf_counter(), []
    while True:
        state = client.get(url).json()
        seen.append((time.perf_counter() - began, state))
        if done(state):
            return state, seen
        time.sleep(every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--budget", type=int, default=120, help="seconds, as the page's slider gives")
    ap.add_argument("--image-size", type=int, default=None, help="default: the backbone's, as on the page")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root, TestClient(create_app(root), base_url="http://127.0.0.1:8000") as c:
        began = time.perf_counter()
        c.post("/api/projects", json={"name": "flow", "classes": list(CLASSES)})
        for klass, folder in CLASSES.items():
            files = sorted(folder.glob("*.jpg"))[: args.per_class]
            for i in range(0, len(files), 16):  # the server's files per request
                batch = [("images", (p.name, p.read_bytes())) for p in files[i : i + 16]]
                answer = c.post(f"/api/projects/flow/classes/{klass}/images", files=batch)
                assert answer.status_code == 201, answer.text
        uploaded = time.perf_counter() - began
        options = {"backbone": args.backbone, "budget_s": args.budget}
        if args.image_size:
            options["image_size"] = args.image_size
        job = c.post("/api/projects/flow/train", json=options).json()

        def ended(jobs: list[dict]) -> bool:
            return next(j for j in jobs if j["id"] == job["id"])["state"] not in ("queued", "running")

        jobs, seen = wait(c, "/api/jobs", ended)
        last = next(j for j in jobs if j["id"] == job["id"])
        first = next((t for t, js in seen if ((js[-1].get("run_progress") or {}).get("epoch") or 0) > 0), None)
        run = c.get(f"/api/runs/{job['run']}").json()
        opened = time.perf_counter()
        page = c.get(f"/runs/{job['run']}/review")
        first_answer = time.perf_counter() - opened
        review, _ = wait(c, f"/api/runs/{job['run']}/review", lambda s: s["state"] != "working", every=0.2)
        print(json.dumps({
            "images": args.per_class * len(CLASSES), "backbone": args.backbone,
            "budget_s": args.budget, "image_size": run["image_size"], "state": last["state"],
            "upload_seconds": round(uploaded, 2), "train_seconds": round(last["elapsed_s"], 1),
            "first_epoch_shown_seconds": None if first is None else round(first, 1),
            "best_val_accuracy": run.get("metrics", {}).get("best_val_accuracy"),
            "review_first_answer_ms": round(1000 * first_answer), "review_says_what_it_does": "Computing" in page.text,
            "review_ready_seconds": round(time.perf_counter() - opened, 1), "review_state": review["state"],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
