"""Ship a trained run as ONNX or TorchScript, with a parity check on real validation images.

The exported graph takes RGB pixels in [0, 1], already brought to the run's square input size
(N x 3 x S x S, float32), and returns class probabilities: normalization, backbone, head and
softmax/sigmoid are all inside. The metadata (classes, size, resize rule, mean/std) is stored
in the file (ONNX metadata_props, TorchScript extra file) and beside it as ``FILE.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.data import index_folder
from transferlab.errors import UserError
from transferlab.files import atomic_write
from transferlab.images import fit_args, pixels
from transferlab.model import TransferNet, probabilities
from transferlab.run import load_net

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


class Exportable(nn.Module):
    """[0, 1] RGB pixels in, probabilities out."""

    def __init__(self, net: TransferNet) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(net.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.spec.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return probabilities(self.net((pixels - self.mean) / self.std))


def metadata(config: dict) -> dict:
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
        "input": "float32 RGB in [0, 1], N x 3 x S x S, resized by transferlab.images.fit; normalization is inside",
        "output": "class probabilities, N x C",
    }


def _val_images(config: dict, limit: int) -> list[Path]:
    data = config["data"]
    try:
        index = index_folder(data["root"], config["val_split"], config["seed"])
    except UserError:
        raise UserError(
            f"the run's data folder {data['root']} is needed for the parity check: make it available again"
        ) from None
    return [s.path for s in index.val[:limit]]


def _save_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, meta: dict) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        input_names=["pixels"],
        output_names=["probabilities"],
        dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}} if dynamic else None,
        opset_version=17,
        dynamo=False,  # the TorchScript-based exporter needs no extra packages
    )
    proto = onnx.load(str(tmp))
    for key, value in {"transferlab": json.dumps(meta)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, proto.SerializeToString())
    tmp.unlink()


def _save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import io

    traced = torch.jit.trace(model, example)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"transferlab.json": json.dumps(meta)})
    atomic_write(path, buf.getvalue())


def run_exported(path: Path, batch: np.ndarray) -> np.ndarray:
    """Probabilities from an exported file (onnxruntime for .onnx, torch.jit for TorchScript)."""
    model = _load_exported(str(path), path.stat().st_mtime_ns)
    if path.suffix == ".onnx":
        return model.run(None, {"pixels": batch})[0]
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


@functools.lru_cache(maxsize=4)
def _load_exported(path: str, _mtime: int):
    if path.endswith(".onnx"):
        from transferlab.predict import onnx_session

        return onnx_session(path)
    return torch.jit.load(path).eval()


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    dynamic_batch: bool = False,
    quantize: bool = False,
    check_images: int = 32,
) -> dict:
    """Export, then check parity on real validation images; raises if probabilities differ by > 1e-4."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use onnx or torchscript")
    if quantize and fmt != "onnx":
        raise UserError("--quantize applies to ONNX only: add --format onnx")
    net, config = load_net(run)
    path = Path(out) if out else Path(run) / f"model{FORMATS[fmt]}"
    meta = metadata(config)
    model = Exportable(net).eval()
    images = _val_images(config, check_images)
    batch = np.stack([pixels(p, *fit_args(meta)) for p in images])
    example = torch.from_numpy(batch if dynamic_batch else batch[:1])
    if fmt == "onnx":
        _save_onnx(model, example, path, dynamic_batch, meta)
    else:
        _save_torchscript(model, example, path, meta)
    atomic_write(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))
    with torch.inference_mode():
        reference = model(torch.from_numpy(batch)).numpy()
    diff = float(np.abs(predict_batches(path, batch, dynamic_batch) - reference).max())
    result = {"path": str(path), "format": fmt, "parity_images": len(images), "max_prob_difference": diff}
    if diff > TOLERANCE:
        raise UserError(f"exported model differs from the run by {diff:.2e} in probability (tolerance {TOLERANCE})")
    if quantize:
        result.update(_quantize(path, config, dynamic_batch))
    return result


def predict_batches(path: Path, batch: np.ndarray, dynamic: bool, size: int = 32) -> np.ndarray:
    """Probabilities for a stack of inputs: in chunks, or one by one for a fixed-batch export."""
    step = size if dynamic else 1
    return np.concatenate([run_exported(path, batch[i : i + step]) for i in range(0, len(batch), step)])


def _quantize(path: Path, config: dict, dynamic: bool) -> dict:
    """int8 dynamic quantization, with float and int8 accuracy on the run's whole validation set."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qpath = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
    atomic_write(qpath.with_name(qpath.name + ".json"), path.with_name(path.name + ".json").read_text())
    val = index_folder(config["data"]["root"], config["val_split"], config["seed"]).val
    batch = np.stack([pixels(s.path, *fit_args(metadata(config))) for s in val])
    y = np.array([s.label for s in val])
    accuracy = {p: float((predict_batches(p, batch, dynamic).argmax(1) == y).mean()) for p in (path, qpath)}
    return {"quantized_path": str(qpath), "float_accuracy": accuracy[path], "int8_accuracy": accuracy[qpath]}
