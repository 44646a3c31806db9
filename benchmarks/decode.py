"""Decoding at a reduced scale: a data set's images decoded and resized, whole against libjpeg's 1/2-1/8 scale.

Every image of the folder (training and validation) goes through ``images.to_square`` at ``--image-size``,
once decoded whole (``load_rgb(path)``) and once only as large as the resize needs (``load_rgb(path,
at_least=...)``, what training, evaluation and export do), alternated over ``--rounds`` in one process;
the best round of each, and how far apart the resized pixels are (mean absolute difference, of 255).

    .venv/bin/python benchmarks/decode.py ../shared/datasets/hymenoptera --image-size 160
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from transferlab.data.images import decode_side, load_rgb, to_square
from transferlab.data.index import index_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    index = index_folder(args.data)
    paths = [s.path for s in index.train + index.val]
    size, side = args.image_size, decode_side(args.image_size)
    ways = {"whole": lambda p: load_rgb(p), "reduced": lambda p: load_rgb(p, at_least=side)}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(args.rounds):
        for name, load in ways.items():
            start = time.perf_counter()
            for p in paths:
                to_square(load(p), size, "bicubic")
            best[name] = min(best[name], time.perf_counter() - start)
    gap = np.mean([
        np.abs(np.asarray(to_square(ways["whole"](p), size, "bicubic"), dtype=np.float32)
               - np.asarray(to_square(ways["reduced"](p), size, "bicubic"), dtype=np.float32)).mean()
        for p in paths
    ])  # fmt: skip
    print(json.dumps({
        "images": len(paths), "image_size": size,
        "whole_seconds": round(best["whole"], 4), "reduced_seconds": round(best["reduced"], 4),
        "speedup": round(best["whole"] / best["reduced"], 2), "mean_abs_pixel_difference": round(float(gap), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
