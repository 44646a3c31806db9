"""Weights from a TFLite classifier file: its convolutions, dequantized, onto the matching timm architecture.

A TFLite MobileNet (Google's hosted and Coral models) stores each convolution with its BatchNorm folded in (a
weight and a bias), quantized to 8 bits with a scale and zero point per tensor or per channel, padded the
TensorFlow way ("SAME"), and a 1x1 convolution of 1,001 logits whose first is a background class. Taken in the
file's operator order, the convolutions map one to one onto timm's model of the same architecture built with
``pad_type="same"``: each convolution gets the dequantized weight, the BatchNorm after it becomes the identity
carrying the folded bias, and the logits convolution becomes the classifier without the background row. The file's
input quantization gives the preprocessing it was trained with: ``(pixel - zero_point) * scale``.

Read with the ``tflite`` package (the flatbuffer schema, pure Python); nothing of TensorFlow runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.errors import UserError
from transferlab.model.zoo import BackboneSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

DTYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 9: np.int8}  # TFLite TensorType codes this reader takes
MAX_BYTES = 512 * 2**20  # a classifier file larger than this is refused before it is read


@dataclass
class Conv:
    """One convolution of the file, in PyTorch's layout: weight [out, in / groups, h, w] and bias [out]."""

    weight: np.ndarray
    bias: np.ndarray
    depthwise: bool


@dataclass
class TFLiteClassifier:
    convs: list[Conv]  # in the file's operator order; the last is the logits convolution
    input_size: int
    mean: tuple[float, float, float]  # the preprocessing in [0, 1] pixels, as a BackboneSpec gives it
    std: tuple[float, float, float]


def _dequantized(model, tensor) -> np.ndarray:
    """A constant tensor's values as float32, its quantization undone (per tensor or per channel)."""
    kind = DTYPES.get(tensor.Type())
    if kind is None:
        raise UserError(f"a TFLite tensor of type code {tensor.Type()}: only float32 and 8-bit files are read")
    raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if isinstance(raw, int):  # no data: not a constant
        raise UserError("a TFLite convolution without constant weights: pass a classifier file, not a graph")
    values = np.frombuffer(raw.tobytes(), dtype=kind).reshape(tensor.ShapeAsNumpy()).astype(np.float32)
    q = tensor.Quantization()
    if kind is np.float32 or q is None or q.ScaleLength() == 0:
        return values
    scale, zero = q.ScaleAsNumpy().astype(np.float32), q.ZeroPointAsNumpy().astype(np.float32)
    if scale.size > 1:  # per channel, along the quantized dimension
        shape = [1] * values.ndim
        shape[q.QuantizedDimension()] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def read_tflite(path: str | Path) -> TFLiteClassifier:
    """The convolutions and input preprocessing of a TFLite classifier, or one line saying why it is not one."""
    import tflite

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}: pass an existing .tflite file")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path} is over {MAX_BYTES // 2**20} MiB: not a classifier file this reader takes")
    buf = path.read_bytes()
    try:
        if buf[4:8] != b"TFL3":
            raise ValueError("no TFL3 identifier")
        model = tflite.Model.GetRootAsModel(buf, 0)
        graph = model.Subgraphs(0)
        codes = {
            i: max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
            for i, c in ((i, model.OperatorCodes(i)) for i in range(model.OperatorCodesLength()))
        }
        convs = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = codes[op.OpcodeIndex()]
            if code not in (tflite.BuiltinOperator.CONV_2D, tflite.BuiltinOperator.DEPTHWISE_CONV_2D):
                continue
            _, w, b = (graph.Tensors(int(t)) for t in op.InputsAsNumpy()[:3])
            weight, bias = _dequantized(model, w), _dequantized(model, b)
            depthwise = code == tflite.BuiltinOperator.DEPTHWISE_CONV_2D
            # TFLite: conv [out, h, w, in], depthwise [1, h, w, out]; PyTorch: [out, in / groups, h, w]
            weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
            convs.append(Conv(np.ascontiguousarray(weight), bias, depthwise))
        source = graph.Tensors(graph.Inputs(0))
        shape, q = source.ShapeAsNumpy(), source.Quantization()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed file
        raise UserError(f"cannot read {path} as a TFLite model ({type(e).__name__}): pass a .tflite file") from None
    if not convs or len(shape) != 4 or shape[1] != shape[2]:
        raise UserError(f"{path} is not a TFLite image classifier (no convolutions, or no square NHWC input)")
    if q is not None and q.ScaleLength():  # uint8 input: pixel * scale - zero * scale
        scale, zero = float(q.ScaleAsNumpy()[0]), float(q.ZeroPointAsNumpy()[0])
        mean, std = zero / 255, 1 / (255 * scale)
    else:  # a float input: the hosted float MobileNets take [-1, 1]
        mean, std = 0.5, 0.5
    return TFLiteClassifier(convs, int(shape[1]), (mean,) * 3, (std,) * 3)


def is_tflite(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ".tflite"


def spec_for(spec: BackboneSpec, weights: str | Path | None) -> BackboneSpec:
    """``spec`` as a TFLite file's weights need it: TensorFlow's padding, the file's input size and preprocessing
    (centre crop 0.875 and bilinear resizing, as TensorFlow's slim models were evaluated); else ``spec`` itself."""
    if not is_tflite(weights):
        return spec
    found = read_tflite(weights)
    return dataclasses.replace(
        spec, pad_type="same", input_size=found.input_size, mean=found.mean, std=found.std, interpolation="bilinear",
        crop_pct=0.875, weights=f"file:{Path(weights).name}", imagenet_top1=None,
    )  # fmt: skip


def tflite_state_dict(model: nn.Module, found: TFLiteClassifier, arch: str, source: str) -> dict[str, torch.Tensor]:
    """``model``'s state dict (a timm model of ``arch`` with or without its classifier) filled from the file."""
    import torch
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = head if isinstance(head, nn.Linear) else None
    body, logits = found.convs[:-1], found.convs[-1]
    kinds = f"{len(found.convs)} convolutions ({sum(c.depthwise for c in found.convs)} depthwise)"
    if len(body) != len(convs):
        raise UserError(
            f"{source} does not fit {arch}: the file has {kinds} where {arch} has {len(convs)} and a classifier; "
            "pass a TFLite file of this architecture (MobileNetV2 1.0: --backbone mobilenet_v2)"
        )
    state = model.state_dict()
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    bns = _batchnorm_after(model)
    for conv, theirs in zip(convs, body):
        name = names[id(conv)]
        if tuple(conv.weight.shape) != theirs.weight.shape:
            raise UserError(
                f"{source} does not fit {arch}: {name} has shape {tuple(conv.weight.shape)} where the file's "
                f"convolution has {theirs.weight.shape}; pass a TFLite file of this architecture"
            )
        state[f"{name}.weight"] = torch.from_numpy(theirs.weight)
        bn = bns.get(name)
        if bn is None:
            raise UserError(f"{arch}'s {name} has no BatchNorm to carry the file's folded bias")
        state[f"{bn}.weight"] = torch.ones(len(theirs.bias))
        state[f"{bn}.bias"] = torch.from_numpy(theirs.bias)
        state[f"{bn}.running_mean"] = torch.zeros(len(theirs.bias))
        # (x - 0) / sqrt(1 - eps + eps): the identity
        state[f"{bn}.running_var"] = torch.full((len(theirs.bias),), 1 - modules[bn].eps)
    if head is not None:
        weight, bias = logits.weight.reshape(logits.weight.shape[0], -1), logits.bias
        if weight.shape[0] == head.out_features + 1:  # a background class first, as TensorFlow's slim models have
            weight, bias = weight[1:], bias[1:]
        if tuple(weight.shape) != tuple(head.weight.shape):
            raise UserError(
                f"{source}'s logits ({weight.shape[0]} classes of {weight.shape[1]} features) do not fit {arch}'s "
                f"classifier of {head.out_features}: pass an ImageNet classifier file"
            )
        classifier = names[id(head)]
        state[f"{classifier}.weight"], state[f"{classifier}.bias"] = torch.from_numpy(weight), torch.from_numpy(bias)
    return state


def _batchnorm_after(model: nn.Module) -> dict[str, str]:
    """Each convolution's name and the name of the BatchNorm that follows it in module order."""
    from torch import nn

    out, last = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and last is not None:
            out[last], last = name, None
    return out
