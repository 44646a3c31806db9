"""The one prediction path: a trained run, a backbone's own ImageNet head, or an exported model.

A ``Predictor`` knows how its model was fed (a ``Preprocess`` read from the run's config or the
export's metadata, never from defaults) and turns a batch of inputs into class probabilities.
``predict`` gives every caller (CLI, web app, export check, evaluation) the same result schema:

    [{"image": str, "top": [{"index": int, "label": str, "prob": float}, ...]}, ...]
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.images import BadImage, Preprocess
from transferlab.errors import UserError
from transferlab.files import expand_images

FORMATS = ("text", "json", "csv")


class Predictor:
    """Class probabilities for images, preprocessed as the model expects; safe to share between threads."""

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], classes: list[str], prep: Preprocess, normalized: bool,
        fixed_batch: bool = False, tta: bool = False, threshold: float | None = None,
    ) -> None:  # fmt: skip
        self.infer, self.classes, self.prep = infer, classes, prep
        self.threshold = threshold  # a top probability under this is "none of these" (None: the model has none)
        self.normalized = normalized  # False: the model takes [0, 1] pixels and normalizes inside (exports)
        self.fixed_batch = fixed_batch  # an export traced for batches of one
        self.tta = tta  # average each image's probabilities with its mirror image's
        self.images, self.seconds = 0, 0.0  # what went through the model so far, and the time it took
        self._lock = threading.Lock()

    def load(self, image: str | Path | io.BytesIO) -> np.ndarray:
        """One image as this model's input row; raises BadImage for anything that is not a readable picture."""
        return self.prep.normalized(image) if self.normalized else self.prep.pixels(image)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` of an ``[N, 3, H, W]`` batch; with ``tta``, mean of it and its horizontal flip.

        A flip is the one augmentation every recipe trains with and that keeps the whole image in view, so
        its average is never a worse guess on average; both copies go through the model in one call.
        """
        with self._lock:
            start = time.perf_counter()
            if self.tta:
                both = self._infer(np.concatenate([batch, batch[..., ::-1]]))
                probs = (both[: len(batch)] + both[len(batch) :]) / 2
            else:
                probs = self._infer(batch)
            self.images, self.seconds = self.images + len(batch), self.seconds + time.perf_counter() - start
            return probs

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        if self.fixed_batch:
            return np.concatenate([self.infer(batch[i : i + 1]) for i in range(len(batch))])
        return self.infer(batch)


def _torch_infer(model, to_probs, fold: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` as a function of a pixel batch; with ``fold``, through a copy with its BatchNorms folded
    (``model.fold_batchnorm``: fewer passes over memory), used only if it agrees with ``model`` on the first images.
    """
    import torch

    from transferlab.model.network import fold_batchnorm, outputs_agree

    model.eval()
    runs = [fold_batchnorm(model), model] if fold else [model]

    def infer(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            if len(runs) > 1:  # the first call: keep the folded copy if it computes what the model does
                runs[:] = [runs[0] if outputs_agree(runs[0](x[:2]), model(x[:2])) else model]
            return to_probs(runs[0](x)).float().numpy()

    return infer


def from_net(net, config: dict) -> Predictor:
    """A trained network in memory with its run's config."""
    from transferlab.model.network import logits_to_probabilities

    infer = _torch_infer(net, logits_to_probabilities, fold=True)
    prep, threshold = Preprocess.from_meta(config), config.get("unknown_threshold")
    return Predictor(infer, list(config["classes"]), prep, True, threshold=threshold)


def from_run(run: str | Path) -> Predictor:
    """A trained run directory's best checkpoint."""
    from transferlab.rundir.folder import load_net

    net, config = load_net(run)
    return from_net(net, config)


def from_backbone(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> Predictor:
    """A pretrained backbone with its own ImageNet-1k head, fed as it was published (centre crop)."""
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import get_spec

    spec = get_spec(name)
    model, _ = create_backbone(spec, weights=weights, num_classes=1000)  # fails fast, before timm's slow import
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    classes = [info.index_to_description(i) for i in range(1000)]
    prep = Preprocess(spec.input_size, spec.interpolation, "crop", spec.crop_pct, spec.mean, spec.std)
    return Predictor(_torch_infer(model, lambda logits: logits.softmax(-1), fold=True), classes, prep, True)


def from_export(path: str | Path) -> Predictor:
    """An exported model: ``.onnx`` on onnxruntime alone, or TorchScript; metadata from the file itself."""
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = json.loads(session.get_modelmeta().custom_metadata_map["transferlab"])
            fixed = session.get_inputs()[0].shape[0] == 1

            def infer(batch: np.ndarray) -> np.ndarray:
                return session.run(None, {"pixels": batch})[0]

        else:
            import torch

            files = {"transferlab.json": ""}
            module = torch.jit.load(str(path), _extra_files=files).eval()
            meta = json.loads(files["transferlab.json"])
            fixed = not meta.get("dynamic_batch", False)  # exports made before it was recorded: one at a time
            infer = _torch_infer(module, lambda probs: probs)
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise UserError(
            f"cannot use {path} ({type(e).__name__}): pass an .onnx or .pt file from `transferlab export`"
        ) from None
    prep, threshold = Preprocess.from_meta(meta), meta.get("unknown_threshold")
    return Predictor(infer, meta["classes"], prep, False, fixed_batch=fixed, threshold=threshold)


def open_predictor(
    run: str | Path | None = None, model: str | Path | None = None, backbone: str = "efficientnet_lite0",
    weights: str | Path | None = None, tta: bool = False,
) -> Predictor:  # fmt: skip
    """The predictor the user named: an exported ``model``, else a ``run``, else the backbone's ImageNet head.

    ``tta``: average each image with its horizontal flip (twice the model's work).
    """
    if model is not None:
        predictor = from_export(model)
    elif run is not None:
        predictor = from_run(run)
    else:
        predictor = from_backbone(backbone, weights)
    predictor.tta = tta
    return predictor


def top_k(image: str, probs: np.ndarray, classes: list[str], k: int, threshold: float | None = None) -> dict:
    """The ``k`` likeliest classes, and the verdict: ``unknown`` when the top probability (``score``) is under the
    run's threshold, the image then being none of its classes (a model without a threshold never says so)."""
    order = np.argsort(-probs, kind="stable")[: min(k, len(classes))]
    score = round(float(probs.max()), 6)  # as shown, so that the verdict is the one its number gives
    return {
        "image": image,
        "top": [{"index": int(j), "label": classes[int(j)], "prob": round(float(probs[j]), 6)} for j in order],
        "score": score,
        "unknown": threshold is not None and score < threshold,
    }


def predict(
    predictor: Predictor, images: Sequence[Any], k: int = 5, batch_size: int = 32, names: Sequence[str] | None = None
) -> list[dict]:
    """Top-k classes per readable image (files, folders of them, or file objects); unreadable ones are skipped.

    The skipped files are named in one warning.
    """
    if names is None:
        images = [f for item in images for f in _files(item)]
        names = [str(p) for p in images]
    readable, bad = [], []
    for image, name in zip(images, names):
        try:
            readable.append((name, predictor.load(image)))
        except BadImage as e:
            bad.append(f"{name} ({e})")
    if bad:
        warnings.warn(
            f"{len(bad)} file(s) are not readable images and were skipped: {'; '.join(bad[:5])}", stacklevel=2
        )
    results = []
    for i in range(0, len(readable), batch_size):
        chunk = readable[i : i + batch_size]
        probs = predictor(np.stack([x for _, x in chunk]))
        results += [top_k(name, p, predictor.classes, k, predictor.threshold) for (name, _), p in zip(chunk, probs)]
    return results


def _files(item: Any) -> list:
    """A folder's image files in a stable order; anything else as it is."""
    if isinstance(item, (str, Path)) and Path(item).is_dir():
        return expand_images([Path(item)])
    return [item]


def probabilities(predictor: Predictor, paths: Sequence[Path], batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """Class probabilities ``[N, C]`` for readable images, decoded in ``workers`` loader processes."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Decoded(paths, predictor.load), batch_size=batch_size, num_workers=workers)
    return np.concatenate([predictor(x.numpy()) for x in loader]) if paths else np.zeros((0, len(predictor.classes)))


class _Decoded:
    """Images decoded by a predictor's ``load``, for a DataLoader."""

    def __init__(self, paths: Sequence[Path], load: Callable) -> None:
        self.paths, self.load = paths, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.load(self.paths[i])


def render(results: list[dict], fmt: str = "text") -> str:
    """Predictions as text (for people), JSON (the API's schema) or CSV (one row per image and rank)."""
    if fmt == "json":
        return json.dumps(results, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "rank", "index", "label", "prob", "unknown"])
        for r in results:
            writer.writerows(
                [r["image"], rank, t["index"], t["label"], f"{t['prob']:.6f}", str(r["unknown"]).lower()]
                for rank, t in enumerate(r["top"], 1)
            )
        return buf.getvalue().rstrip("\n")
    if fmt != "text":
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    lines = []
    for r in results:
        lines.append(r["image"] + ("  (none of these: unsure of every class)" if r["unknown"] else ""))
        lines += [f"  {t['prob']:7.2%}  {t['index']:>4}  {t['label']}" for t in r["top"]]
    return "\n".join(lines)
