"""Ship a trained run as ONNX, TorchScript, TFLite or a timm folder, each proved equal to the trained model.

The exported graph takes 8-bit RGB as images decode, already brought to the run's square input size
(N x S x S x 3, uint8: ``Preprocess.rgb``), and returns class probabilities and each image's "none of
these" score: the scaling, normalization, backbone, head, softmax/sigmoid and the comparison with the
training images are all inside (``model.network.Judged``), so a caller can neither forget nor repeat
them. The metadata (classes, size, resize rule, thresholds, the parity report) is stored in the file
(ONNX metadata_props, a TorchScript extra file, a TFLite metadata entry) and beside it as ``FILE.json``.

Every export is checked on the run's validation images against the trained network: top-1 agreement
(every label, with several per image), the largest probability difference and the accuracy of each.
A float export that differs by more than ``TOLERANCE`` or agrees on fewer than ``MIN_AGREEMENT`` of the
images is not written. ``int8`` also writes a model quantized statically (weights per channel,
activations calibrated on training images), with its own report.

``hf`` writes a timm folder instead (config.json, model.safetensors, README.md): ``timm.create_model(
"local-dir:FOLDER")`` loads it without transferlab; it gives the logits (no "none of these" score).
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
from transferlab.inference.predictor import Judgement, from_export, from_net, judgements, label_thresholds
from transferlab.inference.unknown import TOP_PROBABILITY
from transferlab.model.network import Judged
from transferlab.rundir.folder import RunDir, load_net
from transferlab.rundir.locks import hold

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "tflite": ".tflite", "hf": ""}  # hf: a folder
INT8_FORMATS = ("onnx", "tflite")
TOLERANCE = 1e-4  # the largest probability (and score) difference a float export may have
MIN_AGREEMENT = 0.995  # the share of images on which a float export must give the trained model's answer
PARITY_IMAGES = 1000  # validation images the parity report runs on, at most
CALIBRATION_IMAGES = 128  # training images that set an int8 model's activation ranges


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
        "input_dtype": "uint8",
        "input_layout": "NHWC",
        "input": "uint8 RGB, N x S x S x 3, resized by images.to_square; scaled and normalized inside",
        "output": "probabilities: class probabilities, N x C; score: N, under unknown_threshold is none of these",
    }


def _samples(run: str | Path, config: dict, data: str | Path | None) -> tuple[list, list]:
    """The run's training and validation images, from ``data`` or the folder its config names
    (see ``RunDir.data_root``)."""
    root = RunDir(run).data_root(data, "the parity check's validation images")
    index = index_data(root, config["val_split"], config["seed"], **table_options(config))
    return index.train, index.val


def _save_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import onnx

    traced = path.with_name(".traced.onnx")
    with onnx_pooling():
        torch.onnx.export(
            model,
            (example,),
            str(traced),
            input_names=["pixels"],
            output_names=["probabilities", "score"],
            dynamic_axes={n: {0: "batch"} for n in ("pixels", "probabilities", "score")}
            if meta["dynamic_batch"]
            else None,
            opset_version=17,
            dynamo=False,  # the TorchScript-based exporter needs no extra packages
        )
    proto = onnx.load(str(traced))
    traced.unlink()
    atomic_write(path, _with_meta(proto, meta).SerializeToString())


def _stamp_onnx(path: Path, meta: dict) -> None:
    import onnx

    atomic_write(path, _with_meta(onnx.load(str(path)), meta).SerializeToString())


def _with_meta(proto, meta: dict):
    """``proto`` with ``meta`` as its one ``transferlab`` metadata entry."""
    kept = [e for e in proto.metadata_props if e.key != "transferlab"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "transferlab", json.dumps(meta)
    return proto


def _save_onnx_int8(
    model: nn.Module, example: torch.Tensor, path: Path, qpath: Path, meta: dict, calibration: list
) -> None:
    """Static int8 in ONNX Runtime's QDQ form: weights per channel, activations calibrated on training images.
    The convolutions only: the head and the score's MatMul with the training images' features stay float (a
    threshold set on float scores would judge int8 ones)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.rest, None)
            return None if batch is None else {"pixels": batch.numpy()}

    prepared = qpath.with_name(".prepared.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(qpath), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
        calibrate_method=CalibrationMethod.MinMax,  # Percentile and symmetric int8 activations: no better here
    )  # fmt: skip
    prepared.unlink()
    _stamp_onnx(qpath, meta)


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
    atomic_write(path, _torchscript_bytes(torch.jit.trace(model, example), meta))


def _stamp_torchscript(path: Path, meta: dict) -> None:
    atomic_write(path, _torchscript_bytes(torch.jit.load(str(path)), meta))


def _torchscript_bytes(module: torch.jit.ScriptModule, meta: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={"transferlab.json": json.dumps(meta)})
    return buf.getvalue()


def _save_tflite(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    from transferlab.inference.litert import save_tflite

    save_tflite(model, example, path, meta)


def _save_tflite_int8(
    model: nn.Module, example: torch.Tensor, path: Path, qpath: Path, meta: dict, calibration: list
) -> None:
    from transferlab.inference.litert import save_tflite

    save_tflite(model, example, qpath, meta, calibration)


def _stamp_tflite(path: Path, meta: dict) -> None:
    from transferlab.inference.litert import stamp

    atomic_write(path, stamp(path.read_bytes(), meta))


_SAVE = {"onnx": _save_onnx, "torchscript": _save_torchscript, "tflite": _save_tflite}
_SAVE_INT8 = {"onnx": _save_onnx_int8, "tflite": _save_tflite_int8}
_STAMP = {"onnx": _stamp_onnx, "torchscript": _stamp_torchscript, "tflite": _stamp_tflite}
QUANTIZATION = {
    "onnx": "ONNX Runtime static QDQ: int8 weights per channel, uint8 activations (the convolutions)",
    "tflite": "PyTorch 2 export quantization (litert-torch): int8 weights per channel, int8 activations (the "
    "backbone up to its pooling)",
}


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
    int8: bool = False,
    check_images: int = PARITY_IMAGES,
    data: str | Path | None = None,
) -> dict:
    """Export, then check it on up to ``check_images`` of the run's validation images (see the module's
    docstring); ``int8`` (ONNX, TFLite) also writes ``FILE.int8.EXT``. Returns the parity report.

    The files are written in a scratch folder and take their names only once every check has passed: a
    failed check, a full disk or a kill leaves the previous export (if any) and no partial file.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if int8 and fmt not in INT8_FORMATS:
        raise UserError(f"--int8 applies to {' and '.join(INT8_FORMATS)}: add --format onnx or --format tflite")
    path = Path(out) if out else Path(run) / ("hf" if fmt == "hf" else f"model{FORMATS[fmt]}")
    with hold(run, "export"):
        net, config = load_net(run)
        meta = metadata(config, dynamic_batch and fmt != "tflite")  # TFLite: one image at a time, as phones run
        train, val = _samples(run, config, data)
        val = spread(val, check_images)
        images = [s.path for s in val]
        reference = judgements(from_net(net, config), images)
        prep = Preprocess.from_meta(config)  # the run's own preprocessing
        batch = torch.from_numpy(np.stack([prep.rgb(p) for p in images[:2]]))
        example = batch if meta["dynamic_batch"] else batch[:1]
        model = Judged(net, uint8=True).eval()
        with scratch_dir(path.parent, sweep=path.parent.resolve() == Path(run).resolve()) as scratch:
            staged = scratch / path.name
            if fmt == "hf":
                from transferlab.inference.timm_folder import save_hf

                checks = {
                    "parity": parity,
                    "tolerance": TOLERANCE,
                    "min_agreement": MIN_AGREEMENT,
                    "meta": metadata(config, True),
                }
                report = save_hf(net, config, staged, images, reference, val, checks)
                os.replace(staged, _cleared(path))
                return {"path": str(path), "format": fmt, **report}
            _SAVE[fmt](model, example, staged, meta)
            report = _checked(staged, fmt, meta, images, reference, val, config)
            result = {"path": str(path), "format": fmt, **report}
            written = [staged]
            if int8:
                qstaged = staged.with_name(f"{staged.stem}.int8{staged.suffix}")
                calibration = _calibration(prep, train, meta["dynamic_batch"])
                _SAVE_INT8[fmt](model, example, staged, qstaged, meta, calibration)
                qreport = _checked(qstaged, fmt, meta, images, reference, val, config, int8=len(calibration))
                written.append(qstaged)
                result["int8"] = {"path": str(path.with_name(qstaged.name)), **qreport}
            for f in written:  # each model after its metadata: a reader never finds a model without it
                for name in (f.name + ".json", f.name):
                    os.replace(scratch / name, path.with_name(name))
    return result


def _checked(
    staged: Path, fmt: str, meta: dict, images: list, reference: Judgement, val: list, config: dict, int8: int = 0
) -> dict:
    """The parity report of the file at ``staged``, stamped into its metadata and written beside it; a float
    export that fails it is refused."""
    report = parity(reference, judgements(from_export(staged), images), val, config)
    if not int8 and (report["max_prob_difference"] > TOLERANCE or report["agreement"] < MIN_AGREEMENT):
        raise UserError(
            f"the {fmt} export is not written: it gives the trained model's answer on {report['agreement']:.1%} of "
            f"{report['images']} validation images (at least {MIN_AGREEMENT:.1%} needed) and differs by up to "
            f"{report['max_prob_difference']:.2e} in probability (tolerance {TOLERANCE:.0e})"
        )
    stamped = {**meta, "parity": report}
    if int8:
        stamped["quantization"] = {"method": QUANTIZATION[fmt], "calibration_images": int8}
    _STAMP[fmt](staged, stamped)
    atomic_write(staged.with_name(staged.name + ".json"), json.dumps(stamped, indent=2))
    return report


def parity(reference: Judgement, exported: Judgement, val: list, config: dict) -> dict:
    """How far ``exported`` is from the trained model's ``reference`` on the validation images ``val``: the share
    of images given the same answer (top class; with several labels, the same labels), the largest differences
    in probability and in the "none of these" score, and the accuracy of each as the run's evaluation counts it."""
    (ref_probs, ref_scores), (probs, scores) = reference, exported
    classes = list(config["classes"])
    thresholds = label_thresholds({**config, "classes": classes})
    answers = [
        (p >= np.asarray(thresholds)) if thresholds is not None else p.argmax(1)[:, None] for p in (ref_probs, probs)
    ]
    return {
        "images": len(val),
        "agreement": float(np.mean((answers[0] == answers[1]).all(1))) if len(val) else 1.0,
        "max_prob_difference": float(np.abs(probs - ref_probs).max(initial=0.0)),
        "max_score_difference": float(np.abs(scores - ref_scores).max(initial=0.0)),
        "trained_accuracy": held_out_metrics(ref_probs, val, classes, config)["accuracy"],
        "accuracy": held_out_metrics(probs, val, classes, config)["accuracy"],
    }


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` evenly spaced through them (all when there are fewer): every class of a list in class
    order."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def _calibration(prep: Preprocess, train: list, dynamic: bool) -> list[torch.Tensor]:
    """Up to ``CALIBRATION_IMAGES`` training images, spread over the set, as the export's input batches."""
    rows = [prep.rgb(s.path) for s in spread(train, CALIBRATION_IMAGES)]
    size = 16 if dynamic else 1
    return [torch.from_numpy(np.stack(rows[i : i + size])) for i in range(0, len(rows), size)]


def _cleared(path: Path) -> Path:
    """``path``, with a previous export folder there removed (the new one is complete by now)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    return path
