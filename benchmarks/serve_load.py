"""A bounded load test of `transferlab serve`: N predict requests, C at a time, on 127.0.0.1.

Starts `transferlab serve` on the run's parent folder in its own process (as a user would), waits
until it answers, sends one request to load the model (timed apart), then fires the requests
from C client threads, each one of the run's validation images, and prints the latency
percentiles, the throughput and the errors (any answer but 200).

    .venv/bin/python benchmarks/serve_load.py runs/demo --requests 64 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from transferlab.data.index import index_folder
from transferlab.rundir.folder import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: the server ended with status {server.returncode}")
        try:
            if httpx.get(f"{url}/api/runs", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit(f"error: the server did not answer within {limit:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="A trained run directory")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    run = args.run.resolve()
    config = RunDir(run).read_config()
    images = [s.path for s in index_folder(config["data"]["root"], config["val_split"], config["seed"]).val]
    payloads = [(p.name, p.read_bytes()) for p in images[: args.requests]]
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "transferlab", "serve", str(run.parent), "--port", url.rsplit(":", 1)[1]]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        wait_until_up(url, server)
        endpoint = f"{url}/api/runs/{run.name}/predict"
        with httpx.Client(timeout=120) as client:

            def one(i: int) -> tuple[float, int]:
                start = time.perf_counter()
                answer = client.post(endpoint, files=[("images", payloads[i % len(payloads)])])
                return time.perf_counter() - start, answer.status_code

            first, status = one(0)
            if status != 200:
                sys.exit(f"error: the first request got {status}")
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(10)
    latency = np.array([t for t, _ in results]) * 1000
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "image_size": config["image_size"],
        "backbone": config["spec"]["name"],
        "first_request_ms": round(first * 1000, 1),
        "p50_ms": round(float(np.percentile(latency, 50)), 1),
        "p95_ms": round(float(np.percentile(latency, 95)), 1),
        "max_ms": round(float(latency.max()), 1),
        "requests_per_second": round(args.requests / wall, 1),
        "errors": sum(status != 200 for _, status in results),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
