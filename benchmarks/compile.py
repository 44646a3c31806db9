"""torch.compile for the frozen pass on this machine: images per second against eager, float32 and bf16.

The frozen Lite0 groups, BatchNorm folded as extraction runs them, on a batch of real images:
eager float32, eager bf16 autocast, ``torch.compile`` float32 and compiled bf16 autocast. For each,
the steady images per second (best of ``--repeats``), the first call's seconds (compilation included)
and the lowest cosine between its pooled features and eager float32's; then how many images an
extraction must hold before compiling pays for itself.

    .venv/bin/python benchmarks/compile.py --image-size 224
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transferlab.data.images import load_rgb
from transferlab.data.index import index_folder
from transferlab.data.transforms import eval_transform
from transferlab.model.network import TransferNet, fold_batchnorm, pool
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/hymenoptera"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend ('eager': traced only, a smoke run)")
    args = ap.parse_args()
    spec = get_spec("efficientnet_lite0")
    net = TransferNet(spec, create_backbone(spec)[0], 2).eval()
    groups = fold_batchnorm(net.groups)
    tf = eval_transform(spec, args.image_size, "crop")
    x = torch.stack([tf(load_rgb(s.path)) for s in index_folder(args.data).train[: args.batch]])
    x = x.contiguous(memory_format=torch.channels_last)

    def eager(z: torch.Tensor) -> torch.Tensor:
        for group in groups:
            z = group(z)
        return pool(z)

    def autocast(run):
        def bf16(z: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run(z).float()

        return bf16

    compiled = torch.compile(eager, backend=args.backend)
    ways = {"eager_32": eager, "eager_bf16": autocast(eager), "compiled_32": compiled}
    ways["compiled_bf16"] = autocast(torch.compile(eager, backend=args.backend))
    with torch.no_grad():
        reference = eager(x)
        result: dict = {"image_size": args.image_size, "batch": len(x), "backend": args.backend}
        for name, run in ways.items():
            start = time.perf_counter()
            out = run(x)
            first = time.perf_counter() - start
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(x)
                best = min(best, time.perf_counter() - start)
            cosine = float(torch.nn.functional.cosine_similarity(out, reference).min())
            result[name] = {
                "images_per_second": round(len(x) / best, 1),
                "first_call_seconds": round(first, 2),
                "min_cosine_vs_eager_32": round(cosine, 5),
            }
    for precision in ("32", "bf16"):
        e, c = result[f"eager_{precision}"], result[f"compiled_{precision}"]
        saved_per_image = 1 / e["images_per_second"] - 1 / c["images_per_second"]
        cost = c["first_call_seconds"] - len(x) / c["images_per_second"]
        result[f"compile_pays_off_after_images_{precision}"] = (
            round(cost / saved_per_image) if saved_per_image > 0 else "never"
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
