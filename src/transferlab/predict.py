"""Predictions on image files: top-k of a trained run's classes, from the run or an exported ONNX file."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from transferlab.errors import UserError
from transferlab.images import BadImage, fit_args, load_rgb, pixels


def _top(path: Path, probs: np.ndarray, classes: list[str], k: int) -> dict:
    order = np.argsort(-probs, kind="stable")[:k]
    return {
        "image": str(path),
        "top": [{"index": int(j), "label": classes[int(j)], "prob": round(float(probs[j]), 6)} for j in order],
    }


def _predict(
    images: list[Path], load: Callable[[Path], np.ndarray], infer: Callable[[np.ndarray], np.ndarray],
    classes: list[str], k: int, batch_size: int,
) -> list[dict]:  # fmt: skip
    """Decode what can be decoded, report the rest, run ``infer`` batch by batch."""
    readable, bad = [], []
    for path in images:
        try:
            readable.append((path, load(path)))
        except BadImage as e:
            bad.append(f"{path} ({e})")
    if bad:
        shown = "; ".join(bad[:5])
        warnings.warn(f"{len(bad)} file(s) are not readable images and were skipped: {shown}", stacklevel=3)
    results = []
    for chunk in _chunks(readable, batch_size):
        probs = infer(np.stack([x for _, x in chunk]))
        results += [_top(path, p, classes, min(k, len(classes))) for (path, _), p in zip(chunk, probs)]
    return results


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i : i + size] for i in range(0, len(items), size))


def predict_run(run: str | Path, images: list[Path], k: int = 5, batch_size: int = 32) -> list[dict]:
    """``[{"image", "top": [{"index", "label", "prob"}]}]`` per readable image, through the run's best checkpoint."""
    import torch

    from transferlab.model import probabilities
    from transferlab.run import load_net
    from transferlab.transforms import eval_transform

    net, config = load_net(run)
    transform = eval_transform(net.spec, config["image_size"], config["resize"])

    def infer(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return probabilities(net(torch.from_numpy(batch))).numpy()

    load = lambda path: transform(load_rgb(path)).numpy()  # noqa: E731
    return _predict(images, load, infer, config["classes"], k, batch_size)


def onnx_session(path: str | Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict_onnx(model: str | Path, images: list[Path], k: int = 5, batch_size: int = 32) -> list[dict]:
    """The same predictions from an exported ONNX file, on onnxruntime alone (no PyTorch)."""
    try:
        session = onnx_session(model)
        meta = json.loads(session.get_modelmeta().custom_metadata_map["transferlab"])
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise UserError(
            f"cannot use {model} ({type(e).__name__}): pass an ONNX file from `transferlab export`"
        ) from None
    fixed = session.get_inputs()[0].shape[0] == 1

    def infer(batch: np.ndarray) -> np.ndarray:
        if fixed:
            return np.concatenate([session.run(None, {"pixels": batch[i : i + 1]})[0] for i in range(len(batch))])
        return session.run(None, {"pixels": batch})[0]

    return _predict(images, lambda path: pixels(path, *fit_args(meta)), infer, meta["classes"], k, batch_size)
