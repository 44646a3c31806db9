"""The one prediction path: a trained run, a backbone's own ImageNet head, or an exported model.

A ``Predictor`` knows how its model was fed (a ``Preprocess`` read from the run's config or the
export's metadata, never from defaults) and turns a batch of inputs into class probabilities and each
image's "none of these" score. ``predict`` gives every caller (CLI, web app, export check, evaluation)
the same result schema:

    [{"image": str, "top": [{"index": int, "label": str, "prob": float}, ...], "score": float,
      "unknown": bool}, ...]

with, for a run of several labels per image, ``"labels"``: every class at or above its threshold, as ``top``'s
entries (each class has its own sigmoid probability; none above its threshold is an image of no label).
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
from transferlab.inference.unknown import TOP_PROBABILITY

FORMATS = ("text", "json", "csv")


Judgement = tuple[np.ndarray, np.ndarray]  # class probabilities [N, C] and the "none of these" score [N]


class Predictor:
    """Class probabilities and scores for images, preprocessed as the model expects; safe to share between threads.

    ``infer`` maps a batch to its probabilities and scores (the similarity to the training images for a run that
    keeps them, else the top probability: ``model.network.Judged``); a score under ``threshold`` is "none of these".
    """

    def __init__(
        self, infer: Callable[[np.ndarray], Judgement], classes: list[str], prep: Preprocess, inputs: str,
        fixed_batch: bool = False, tta: bool = False, threshold: float | None = None,
        score: str = TOP_PROBABILITY, label_thresholds: list[float] | None = None,
    ) -> None:  # fmt: skip
        self.infer, self.classes, self.prep = infer, classes, prep
        self.label_thresholds = label_thresholds  # several labels per image: each class's (None: one label)
        self.threshold = threshold  # a score under this is "none of these" (None: the model never says so)
        self.score = score  # what the score is, in words
        # what the model takes: "normalized" (networks), "rgb" (exports: 8-bit, N x S x S x 3, normalized inside),
        # "pixels" (exports made before that: [0, 1] floats, N x 3 x S x S)
        self.inputs = inputs
        self.fixed_batch = fixed_batch  # an export traced for batches of one
        self.tta = tta  # average each image's probabilities with its mirror image's (the score stays the image's)
        self.images, self.seconds = 0, 0.0  # what went through the model so far, and the time it took
        self._lock = threading.Lock()

    def load(self, image: str | Path | io.BytesIO) -> np.ndarray:
        """One image as this model's input row; raises BadImage for anything that is not a readable picture."""
        return getattr(self.prep, self.inputs)(image)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` of a batch of ``load``'s rows (see ``judge``)."""
        return self.judge(batch)[0]

    def judge(self, batch: np.ndarray) -> Judgement:
        """Probabilities and scores of a batch of ``load``'s rows; with ``tta``, the probabilities are the mean of
        it and its horizontal flip's.

        A flip is the one augmentation every recipe trains with and that keeps the whole image in view, so
        its average is never a worse guess on average; both copies go through the model in one call.
        """
        with self._lock:
            start = time.perf_counter()
            if self.tta:
                mirrored = batch[:, :, ::-1] if self.inputs == "rgb" else batch[..., ::-1]  # the width axis
                probs, scores = self._infer(np.concatenate([batch, mirrored]))
                n = len(batch)  # the score is the plain image's: the threshold was set on plain images
                probs, scores = (probs[:n] + probs[n:]) / 2, scores[:n]
            else:
                probs, scores = self._infer(batch)
            self.images, self.seconds = self.images + len(batch), self.seconds + time.perf_counter() - start
            return probs, scores

    def _infer(self, batch: np.ndarray) -> Judgement:
        batch = np.ascontiguousarray(batch)
        if self.fixed_batch:
            return _joined([self.infer(batch[i : i + 1]) for i in range(len(batch))])
        return self.infer(batch)


def _torch_infer(model, fold: bool = False) -> Callable[[np.ndarray], Judgement]:
    """``model`` (a batch to probabilities and scores) as a function of a pixel batch; with ``fold``, through a copy
    with its BatchNorms folded (``model.fold_batchnorm``: fewer passes over memory), used only if it agrees with
    ``model`` on the first images.
    """
    import torch

    from transferlab.model.network import fold_batchnorm, outputs_agree

    model.eval()
    runs = [fold_batchnorm(model), model] if fold else [model]

    def infer(batch: np.ndarray) -> Judgement:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            if len(runs) > 1:  # the first call: keep the folded copy if it computes what the model does
                folded, plain = runs[0](x[:2]), model(x[:2])
                agree = all(outputs_agree(a, b) for a, b in zip(folded, plain))
                runs[:] = [runs[0] if agree else model]
            probs, scores = runs[0](x)
            return probs.float().numpy(), scores.float().numpy()

    return infer


def from_net(net, config: dict) -> Predictor:
    """A trained network in memory with its run's config."""
    from transferlab.inference.unknown import score_name
    from transferlab.model.network import Judged

    infer = _torch_infer(Judged(net), fold=True)
    score = score_name(net)
    # the run's threshold only for the score it was set on (last.ckpt keeps no training images' features)
    threshold = config.get("unknown_threshold") if config.get("unknown_score", TOP_PROBABILITY) == score else None
    prep = Preprocess.from_meta(config)
    labels = label_thresholds(config)
    return Predictor(
        infer, list(config["classes"]), prep, "normalized", threshold=threshold, score=score, label_thresholds=labels
    )


def label_thresholds(meta: dict) -> list[float] | None:
    """Each class's threshold of a run (or export) of several labels per image: its finish's choice, else even
    odds (a run read before its finish); None for one label per image."""
    if not meta.get("multi_label"):
        return None
    return list(meta.get("label_thresholds") or [0.5] * len(meta["classes"]))


def from_run(run: str | Path) -> Predictor:
    """A trained run directory's best checkpoint."""
    from transferlab.rundir.folder import load_net

    net, config = load_net(run)
    return from_net(net, config)


def from_backbone(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> Predictor:
    """A pretrained backbone with its own ImageNet-1k head, fed as it was published (centre crop)."""
    from transferlab.model.tflite import spec_for
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import get_spec

    spec = spec_for(get_spec(name), weights)  # a TFLite file's own padding and preprocessing
    model, _ = create_backbone(spec, weights=weights, num_classes=1000)  # fails fast, before timm's slow import
    from timm.data import ImageNetInfo

    from transferlab.model.network import Softmaxed

    info = ImageNetInfo()
    classes = [info.index_to_description(i) for i in range(1000)]
    prep = Preprocess(spec.input_size, spec.interpolation, "crop", spec.crop_pct, spec.mean, spec.std)
    return Predictor(_torch_infer(Softmaxed(model), fold=True), classes, prep, "normalized")


def from_export(path: str | Path) -> Predictor:
    """An exported model: ``.onnx`` on onnxruntime alone, TorchScript, or ``.tflite`` on LiteRT; metadata from
    the file itself."""
    path = Path(path)
    try:
        if path.suffix == ".tflite":
            from transferlab.inference.litert import open_tflite

            infer, meta, fixed = open_tflite(path)
        elif path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = json.loads(session.get_modelmeta().custom_metadata_map["transferlab"])
            fixed = session.get_inputs()[0].shape[0] == 1

            def infer(batch: np.ndarray) -> Judgement:
                return _pair(session.run(None, {"pixels": batch}))

        else:
            import torch

            files = {"transferlab.json": ""}
            module = torch.jit.load(str(path), _extra_files=files).eval()
            meta = json.loads(files["transferlab.json"])
            fixed = not meta.get("dynamic_batch", False)  # exports made before it was recorded: one at a time

            def infer(batch: np.ndarray) -> Judgement:
                with torch.inference_mode():
                    out = module(torch.from_numpy(np.ascontiguousarray(batch)))
                return _pair([o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))])

    except ImportError as e:
        extra = "tflite" if path.suffix == ".tflite" else "export"
        raise UserError(f"cannot use {path}: {e.name} is not installed (pip install 'transferlab[{extra}]')") from None
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise UserError(
            f"cannot use {path} ({type(e).__name__}): pass an .onnx, .pt or .tflite file from `transferlab export`"
        ) from None
    prep, threshold, score = Preprocess.from_meta(meta), meta.get("unknown_threshold"), meta.get("score")
    inputs = "rgb" if meta.get("input_dtype") == "uint8" else "pixels"  # exports made before 8-bit input: floats
    return Predictor(
        infer, meta["classes"], prep, inputs, fixed, threshold=threshold, score=score or TOP_PROBABILITY,
        label_thresholds=label_thresholds(meta),
    )  # fmt: skip


def _pair(outputs: list) -> Judgement:
    """An export's outputs as probabilities and scores (an export made before it had a score: the top probability)."""
    probs = np.asarray(outputs[0])
    return probs, np.asarray(outputs[1]) if len(outputs) > 1 else probs.max(1)


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


def top_k(
    image: str, probs: np.ndarray, score: float, classes: list[str], k: int, threshold: float | None = None,
    label_thresholds: list[float] | None = None,
) -> dict:  # fmt: skip
    """The ``k`` likeliest classes, and the verdict: ``unknown`` when the image's ``score`` is under the run's
    threshold, the image then being none of its classes (a model without a threshold never says so). With
    ``label_thresholds`` (several labels per image): ``labels``, every class at or above its own, likeliest first."""

    def entry(j: int) -> dict:
        return {"index": int(j), "label": classes[int(j)], "prob": round(float(probs[j]), 6)}

    order = np.argsort(-probs, kind="stable")
    score = round(float(score), 6)  # as shown, so that the verdict is the one its number gives
    result = {
        "image": image,
        "top": [entry(j) for j in order[: min(k, len(classes))]],
        "score": score,
        "unknown": threshold is not None and score < threshold,
    }
    if label_thresholds is not None:  # compared as shown, as the score is
        result["labels"] = [entry(j) for j in order if round(float(probs[j]), 6) >= label_thresholds[j]]
    return result


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
        probs, scores = predictor.judge(np.stack([x for _, x in chunk]))
        results += [
            top_k(name, p, score, predictor.classes, k, predictor.threshold, predictor.label_thresholds)
            for (name, _), p, score in zip(chunk, probs, scores)
        ]
    return results


def _files(item: Any) -> list:
    """A folder's image files in a stable order; anything else as it is."""
    if isinstance(item, (str, Path)) and Path(item).is_dir():
        return expand_images([Path(item)])
    return [item]


def probabilities(predictor: Predictor, paths: Sequence[Path], batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """Class probabilities ``[N, C]`` for readable images, decoded in ``workers`` loader processes."""
    return judgements(predictor, paths, batch_size, workers)[0]


def judgements(predictor: Predictor, paths: Sequence[Path], batch_size: int = 64, workers: int = 0) -> Judgement:
    """Class probabilities ``[N, C]`` and "none of these" scores ``[N]`` for readable images (see ``probabilities``)."""
    from torch.utils.data import DataLoader

    if not paths:
        return np.zeros((0, len(predictor.classes))), np.zeros(0)
    loader = DataLoader(_Decoded(paths, predictor.load), batch_size=batch_size, num_workers=workers)
    return _joined([predictor.judge(x.numpy()) for x in loader])


def _joined(parts: list[Judgement]) -> Judgement:
    """The judgements of consecutive batches as one."""
    return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])


def pooled_features(net, prep: Preprocess, paths: Sequence[Path], workers: int = 0, batch_size: int = 64):
    """The pooled backbone features ``[N, D]`` (a torch tensor) of images preprocessed by ``prep``, in float32."""
    import torch
    from torch.utils.data import DataLoader

    was_training = net.training
    net.eval()
    loader = DataLoader(_Decoded(paths, prep.normalized), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode():
        features = torch.cat([net.features(x) for x in loader])
    net.train(was_training)
    return features.clone()  # a normal tensor, usable outside inference mode


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
        several = any("labels" in r for r in results)  # a column: whether the class is one of the image's labels
        writer.writerow(["image", "rank", "index", "label", "prob", "unknown"] + ["labelled"] * several)
        for r in results:
            chosen = {t["index"] for t in r.get("labels", [])}
            writer.writerows(
                [r["image"], rank, t["index"], t["label"], f"{t['prob']:.6f}", str(r["unknown"]).lower()]
                + [str(t["index"] in chosen).lower()] * several
                for rank, t in enumerate(r["top"], 1)
            )
        return buf.getvalue().rstrip("\n")
    if fmt != "text":
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    lines = []
    for r in results:
        lines.append(r["image"] + ("  (none of these)" if r["unknown"] else ""))
        if "labels" in r:
            lines.append("  labels: " + (", ".join(f"{t['label']} {t['prob']:.2%}" for t in r["labels"]) or "none"))
        lines += [f"  {t['prob']:7.2%}  {t['index']:>4}  {t['label']}" for t in r["top"]]
    return "\n".join(lines)
