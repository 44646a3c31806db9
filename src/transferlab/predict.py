"""Predictions of a trained run on image files: top-k of its classes with probabilities."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from transferlab.images import BadImage, eval_transform, load_rgb
from transferlab.run import load_net


def predict_run(run: str | Path, images: list[Path], k: int = 5, batch_size: int = 32) -> list[dict]:
    """``[{"image", "top": [{"index", "label", "prob"}]}]`` per readable image; unreadable ones are reported."""
    net, config = load_net(run)
    classes = config["classes"]
    transform = eval_transform(net.spec, config["image_size"])
    k = min(k, len(classes))
    results, bad = [], []
    readable: list[tuple[Path, torch.Tensor]] = []
    for path in images:
        try:
            readable.append((path, transform(load_rgb(path))))
        except BadImage as e:
            bad.append(f"{path} ({e})")
    from transferlab.model import probabilities

    with torch.inference_mode():
        for i in range(0, len(readable), batch_size):
            chunk = readable[i : i + batch_size]
            probs = probabilities(net(torch.stack([x for _, x in chunk])))
            for (path, _), p in zip(chunk, probs):
                top = p.topk(k)
                results.append(
                    {
                        "image": str(path),
                        "top": [
                            {"index": int(j), "label": classes[int(j)], "prob": round(float(q), 6)}
                            for q, j in zip(top.values, top.indices)
                        ],
                    }
                )
    if bad:
        warnings.warn(
            f"{len(bad)} file(s) are not readable images and were skipped: {'; '.join(bad[:5])}", stacklevel=2
        )
    return results
