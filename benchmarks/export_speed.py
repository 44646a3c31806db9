"""Every export of a trained run against the run itself: images per second, accuracy and agreement.

PyTorch (the run as predict runs it, BatchNorms folded), TorchScript, ONNX float and int8 (static QDQ),
TFLite float and int8 (with the `tflite` extra). Same images (the run's validation images, decoded and
resized once), model time only; each export at batches of ``--batch-size`` where it takes any batch and
one image at a time (as phones run it) for all. Accuracy and agreement are each export's own parity
report (``transferlab export``) on the same images.

    .venv/bin/python benchmarks/export_speed.py runs/demo [--formats onnx,tflite]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from transferlab.data.images import Preprocess
from transferlab.data.labels import index_data, table_options
from transferlab.inference.export import export_run, spread
from transferlab.inference.predictor import from_export, from_run
from transferlab.rundir.folder import RunDir


def timed(judge, batches: list[np.ndarray], repeats: int) -> float:
    """Best-of-``repeats`` images per second over all batches (after one warm-up batch)."""
    judge(batches[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            judge(b)
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="torchscript,onnx,tflite", help="exports to measure besides PyTorch")
    ap.add_argument("--images", type=int, default=1000, help="validation images, at most (spread over the set)")
    args = ap.parse_args()
    run = Path(args.run)
    config = RunDir(run).read_config()
    root = RunDir(run).data_root(None, "the run's images")
    val = spread(index_data(root, config["val_split"], config["seed"], **table_options(config)).val, args.images)
    prep = Preprocess.from_meta(config)  # the run's own resize rule, as its predictions use
    rgb = np.stack([prep.rgb(s.path) for s in val])
    normalized = np.stack([prep.normalized(s.path) for s in val])
    results = {"images": len(val), "batch_size": args.batch_size, "image_size": prep.image_size, "rows": []}

    def measure(name: str, predictor, rows: np.ndarray, report: dict) -> None:
        sizes = [1] if predictor.fixed_batch else [args.batch_size, 1]
        for size in sizes:
            batches = [rows[i : i + size] for i in range(0, len(rows), size)]
            if size == 1:
                batches = batches[: max(8, min(len(batches), 64))]  # one at a time: enough for a rate
            row = {"format": name, "batch": size, "images_per_second": round(timed(predictor.judge, batches,
                   args.repeats), 2), "accuracy": round(report["accuracy"], 4),
                   "agreement": round(report["agreement"], 4)}  # fmt: skip
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        formats = [f for f in args.formats.split(",") if f]
        exports = {}
        for fmt in formats:
            out = Path(tmp) / f"m.{ {'torchscript': 'pt'}.get(fmt, fmt) }"
            exports[fmt] = export_run(run, fmt, out, dynamic_batch=True, int8=fmt in ("onnx", "tflite"),
                                      check_images=args.images)  # fmt: skip
        trained = next(iter(exports.values()), None)
        own = {"accuracy": trained["trained_accuracy"], "agreement": 1.0} if trained else None
        measure("pytorch", from_run(run), normalized, own or {"accuracy": float("nan"), "agreement": 1.0})
        for fmt, r in exports.items():
            measure(f"{fmt}", from_export(r["path"]), rgb, r)
            if "int8" in r:
                measure(f"{fmt}_int8", from_export(r["int8"]["path"]), rgb, r["int8"])
    Path(run, "export_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
