"""Batch inference speed of a trained run: PyTorch (the run as exported, and as predict runs it with its
BatchNorms folded), TorchScript, onnxruntime, int8 onnxruntime.

Same images (the run's validation images, decoded and resized once), same batch size, model
time only; plus the int8 model's validation accuracy next to the float model's.

    .venv/bin/python benchmarks/export_speed.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.data.images import Preprocess
from transferlab.data.index import index_folder
from transferlab.inference.export import export_run
from transferlab.inference.predictor import from_export, from_run
from transferlab.model.network import Judged
from transferlab.rundir.folder import load_net


def timed(infer, batches: list[np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Best-of-``repeats`` images per second over all batches, and the last outputs."""
    infer(batches[0])
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = np.concatenate([infer(b) for b in batches])
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    net, config = load_net(args.run)
    val = index_folder(config["data"]["root"], config["val_split"], config["seed"]).val
    prep = Preprocess.from_meta(config)  # the run's own resize rule, as its predictions use
    data = np.stack([prep.pixels(s.path) for s in val])
    labels = np.array([s.label for s in val])
    batches = [data[i : i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    model = Judged(net, normalize=True).eval()
    results = {"images": len(data), "batch_size": args.batch_size, "image_size": prep.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_run(args.run, "onnx", Path(tmp) / "m.onnx", dynamic_batch=True, quantize=True)
        ts = export_run(args.run, "torchscript", Path(tmp) / "m.pt", dynamic_batch=True)
        scripted = torch.jit.load(ts["path"]).eval()
        exported = {"onnxruntime": onnx["path"], "onnxruntime_int8": onnx["quantized_path"]}

        def torch_infer(m):
            def infer(b):
                with torch.inference_mode():
                    return m(torch.from_numpy(b))[0].numpy()  # probabilities

            return infer

        mean, std = (np.array(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in (prep.mean, prep.std))
        normalized = [(b - mean) / std for b in batches]  # what predict feeds the run's network
        runners = {
            "pytorch_run": (torch_infer(model), batches),
            "pytorch_run_folded": (from_run(args.run), normalized),  # predict, evaluate, serve
            "torchscript": (torch_infer(scripted), batches),
        }
        runners |= {name: (from_export(path), batches) for name, path in exported.items()}
        for name, (infer, inputs) in runners.items():
            ips, probs = timed(infer, inputs, args.repeats)
            results[name] = {
                "images_per_second": round(ips, 2),
                "accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
            }
            print(name, json.dumps(results[name]), flush=True)
    Path(args.run, "export_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
