"""Ship a trained run as ONNX or TorchScript, with a parity check on real validation images.

The exported graph takes RGB pixels in [0, 1], already brought to the run's square input size
(N x 3 x S x S, float32), and returns class probabilities and each image's "none of these" score:
normalization, backbone, head, softmax/sigmoid and the comparison with the training images are all
inside (``model.network.Judged``). The metadata (classes, size, resize rule, mean/std, the score's
threshold) is stored in the file (ONNX metadata_props, TorchScript extra file) and beside it as
``FILE.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.data.images import Preprocess
from transferlab.data.labels import index_data, table_options
from transferlab.errors import UserError
from transferlab.files import atomic_write
from transferlab.inference.evaluate import held_out_metrics
from transferlab.inference.predictor import from_export, from_net, judgements, probabilities
from transferlab.inference.unknown import TOP_PROBABILITY
from transferlab.model.network import Judged
from transferlab.rundir.folder import RunDir, load_net
from transferlab.rundir.locks import hold

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


def metadata(config: dict, dynamic_batch: bool) -> dict:
    spec = config["spec"]
    return {
        "classes": config["classes"],
        "image_size": config["image_size"],
        "interpolation": spec["interpolation"],
        "resize": config["resize"],
        "crop_pct": spec["crop_pct"],
        "mean": list(spec["mean"]),
        "std": list(spec["std"]),
        "backbone": spec["name"],
        "dynamic_batch": dynamic_batch,
        "score": config.get("unknown_score", TOP_PROBABILITY),
        "unknown_threshold": config.get("unknown_threshold"),  # a score under it: none of the classes
        "multi_label": bool(config.get("multi_label")),  # a sigmoid per class, each with its threshold
        "label_thresholds": config.get("label_thresholds"),
        "input": "float32 RGB in [0, 1], N x 3 x S x S, resized by images.to_square; normalized inside",
        "output": "probabilities: class probabilities, N x C; score: N, under unknown_threshold is none of these",
    }


def _val_samples(run: str | Path, config: dict, data: str | Path | None) -> list:
    """The run's validation images, from ``data`` or the folder its config names (see ``RunDir.data_root``)."""
    root = RunDir(run).data_root(data, "the parity check's validation images")
    return index_data(root, config["val_split"], config["seed"], **table_options(config)).val


def _save_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, meta: dict) -> None:
    import onnx

    traced = path.with_name(".traced.onnx")
    with onnx_pooling():
        torch.onnx.export(
            model,
            (example,),
            str(traced),
            input_names=["pixels"],
            output_names=["probabilities", "score"],
            dynamic_axes={name: {0: "batch"} for name in ("pixels", "probabilities", "score")} if dynamic else None,
            opset_version=17,
            dynamo=False,  # the TorchScript-based exporter needs no extra packages
        )
    proto = onnx.load(str(traced))
    traced.unlink()
    entry = proto.metadata_props.add()
    entry.key, entry.value = "transferlab", json.dumps(meta)
    atomic_write(path, proto.SerializeToString())


@contextmanager
def onnx_pooling() -> Iterator[None]:
    """Adaptive average pooling to a size that does not divide the input's, which ONNX cannot express, as
    the same averages by two constant matrices while a model is traced (timm's VGG head pools a map under
    7 x 7 up to 7 x 7: every VGG under 224 px)."""
    functional = torch.nn.functional
    original = functional.adaptive_avg_pool2d

    def pool(x: torch.Tensor, output_size) -> torch.Tensor:
        size = tuple(int(d) for d in x.shape[-2:])  # constants: the export is at one input size
        out = tuple(s if o is None else int(o) for s, o in zip(size, _pair(output_size)))
        if all(s % o == 0 for s, o in zip(size, out)):
            return original(x, output_size)
        rows, cols = (_bins(s, o).to(x.dtype) for s, o in zip(size, out))
        return rows @ x @ cols.T

    functional.adaptive_avg_pool2d = pool
    try:
        yield
    finally:
        functional.adaptive_avg_pool2d = original


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _bins(size: int, out: int) -> torch.Tensor:
    """``out`` x ``size``: row i averages PyTorch's adaptive bin i, [floor(i s / o), ceil((i + 1) s / o))."""
    matrix = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:end] = 1 / (end - start)
    return matrix


def _save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import io

    traced = torch.jit.trace(model, example)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"transferlab.json": json.dumps(meta)})
    atomic_write(path, buf.getvalue())


@contextmanager
def scratch_dir(folder: Path, sweep: bool) -> Iterator[Path]:
    """A ``.export.*`` folder in ``folder`` for everything an export writes before it has passed its checks.

    Removed however the block ends; ``sweep`` also removes those a killed export left (only where the
    caller holds the folder's lock, so none of them is live).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if sweep:
        for leftover in folder.glob(".export.*"):
            shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export.") as scratch:
        yield Path(scratch)


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    dynamic_batch: bool = False,
    quantize: bool = False,
    check_images: int = 32,
    data: str | Path | None = None,
) -> dict:
    """Export, then check parity on real validation images; raises if probabilities or scores differ by > 1e-4.

    The files are written in a scratch folder and take their names only once every check has passed: a
    failed check, a full disk or a kill leaves the previous export (if any) and no partial file.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use onnx or torchscript")
    if quantize and fmt != "onnx":
        raise UserError("--quantize applies to ONNX only: add --format onnx")
    path = Path(out) if out else Path(run) / f"model{FORMATS[fmt]}"
    with hold(run, "export"):
        net, config = load_net(run)
        meta = metadata(config, dynamic_batch)
        model = Judged(net, normalize=True).eval()
        val = _val_samples(run, config, data)
        images = [s.path for s in val[:check_images]]
        prep = Preprocess.from_meta(config)  # the run's own preprocessing
        batch = np.stack([prep.pixels(p) for p in images])
        example = torch.from_numpy(batch if dynamic_batch else batch[:1])
        with scratch_dir(path.parent, sweep=path.parent.resolve() == Path(run).resolve()) as scratch:
            staged = scratch / path.name
            if fmt == "onnx":
                _save_onnx(model, example, staged, dynamic_batch, meta)
            else:
                _save_torchscript(model, example, staged, meta)
            atomic_write(staged.with_name(staged.name + ".json"), json.dumps(meta, indent=2))
            # parity: the exported file against the trained network, both through the one prediction path
            reference, reference_scores = judgements(from_net(net, config), images)
            probs, scores = judgements(from_export(staged), images)
            diff, score_diff = float(np.abs(probs - reference).max()), float(np.abs(scores - reference_scores).max())
            result = {"path": str(path), "format": fmt, "parity_images": len(images), "max_prob_difference": diff,
                      "max_score_difference": score_diff}  # fmt: skip
            if max(diff, score_diff) > TOLERANCE:
                raise UserError(
                    f"exported model differs from the run by {diff:.2e} in probability and {score_diff:.2e} in its "
                    f"none-of-these score (tolerance {TOLERANCE})"
                )
            written = [staged]
            if quantize:
                q = _quantize(staged, val)
                written.append(Path(q.pop("quantized_path")))
                result.update(q, quantized_path=str(path.with_name(written[-1].name)))
            for f in written:  # each model after its metadata: a reader never finds a model without it
                for name in (f.name + ".json", f.name):
                    os.replace(scratch / name, path.with_name(name))
    return result


def _quantize(path: Path, val: list) -> dict:
    """int8 dynamic quantization, with float and int8 accuracy on the run's whole validation set."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qpath = path.with_name(path.stem + ".int8.onnx")
    # the convolutions only: the head's Gemm was never quantized, and the score's MatMul with the training images'
    # features must stay float, or the threshold set on float scores would judge int8 ones
    quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    atomic_write(qpath.with_name(qpath.name + ".json"), path.with_name(path.name + ".json").read_text())
    meta = json.loads(qpath.with_name(qpath.name + ".json").read_text())
    paths = [s.path for s in val]
    # accuracy as the run's evaluation counts it (with several labels per image: every label of the image right)
    accuracy = {
        p: held_out_metrics(probabilities(from_export(p), paths), val, meta["classes"], meta)["accuracy"]
        for p in (path, qpath)
    }
    return {"quantized_path": str(qpath), "float_accuracy": accuracy[path], "int8_accuracy": accuracy[qpath]}
