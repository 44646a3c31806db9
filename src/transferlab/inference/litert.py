"""TFLite exports, through Google's PyTorch-to-LiteRT converter (``litert-torch``), run on LiteRT
(``ai-edge-litert``): float32, or int8 calibrated on training images (PyTorch 2 export quantization,
per-channel weights). The optional extra ``transferlab[tflite]``; only exports and predictors of
``.tflite`` files import this module.

The metadata (classes, size, resize rule, thresholds, parity) is a ``transferlab`` entry of the
flatbuffer's own metadata table, which TFLite keeps for this purpose and every runtime ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.files import atomic_write

METADATA = b"transferlab"


def save_tflite(
    model: nn.Module, example: torch.Tensor, path: Path, meta: dict, calibration: Iterable[torch.Tensor] = ()
) -> None:
    """``model`` (a ``Judged`` taking 8-bit N x S x S x 3, as the exports do) as a .tflite file with ``meta``;
    with ``calibration`` batches of training images: int8 weights and activations, their ranges from those."""
    import litert_torch

    model = model.eval()
    batches = list(calibration)
    with _quiet():
        if not batches:
            edge = litert_torch.convert(model, (example,))
        else:
            from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import move_exported_model_to_eval
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = _network_quantizer(get_symmetric_quantization_config(is_per_channel=True))
            graph = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
            move_exported_model_to_eval(graph)
            with torch.no_grad():
                for batch in batches:
                    graph(batch)
            graph = move_exported_model_to_eval(convert_pt2e(graph, fold_quantize=False))
            for module in graph.modules():  # the flag the converter reads; the graph's ops already are eval's
                module.training = False
            edge = litert_torch.convert(graph, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
        data = edge.model_content()
    atomic_write(path, stamp(bytes(data), meta))


def _network_quantizer(config):
    """litert-torch's quantizer, for the backbone's layer groups up to timm's pooling: the pooled features, the
    head, the probabilities and the score stay float. Quantized, the pooled features were given two scales that
    the converter mixed up (the head then read them wrongly), and a threshold set on float scores would judge
    int8 ones. Its own ``set_module_type`` would miss every convolution here: it asks the same of the
    weights, which have no module."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from litert_torch.quantize.pt2e_quantizer_utils import propagate_annotation

    def inside(node) -> bool:
        paths = [str(path) for path, _ in node.meta.get("nn_module_stack", {}).values()]
        types = [str(t) for _, t in node.meta.get("nn_module_stack", {}).values()]
        in_groups = any(p.startswith("net.groups.") for p in paths) and not any(t.endswith(".Pooling") for t in types)
        return node.op == "get_attr" or in_groups

    class Network(PT2EQuantizer):
        def annotate(self, model):
            self._annotate_all_static_patterns(model, self.global_config, inside)
            propagate_annotation(model)
            return model

    return Network().set_global(config)


@contextlib.contextmanager
def _quiet():
    """The converter's progress lines off the user's terminal (its errors still raise)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def stamp(data: bytes, meta: dict) -> bytes:
    """The flatbuffer ``data`` with ``meta`` as its ``transferlab`` metadata entry (replaced if it has one)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    payload = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    entries = [m for m in model.metadata or [] if m.name == METADATA]
    if entries:
        model.buffers[entries[0].buffer].data = payload
    else:
        buffer, entry = schema.BufferT(), schema.MetadataT()
        buffer.data, entry.name, entry.buffer = payload, METADATA, len(model.buffers)
        model.buffers.append(buffer)
        model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(len(data) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(data: bytes) -> dict:
    """The ``transferlab`` entry of a .tflite file's metadata; KeyError for a file that has none."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise KeyError("no transferlab metadata")


def open_tflite(path: Path) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dict, bool]:
    """A .tflite export's inference function, metadata, and whether it takes one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    data = Path(path).read_bytes()
    meta = read_metadata(data)
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    (source,) = interpreter.get_input_details()
    outputs = sorted(interpreter.get_output_details(), key=lambda d: d["name"])  # probabilities, then score

    def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        interpreter.set_tensor(source["index"], np.ascontiguousarray(batch, dtype=source["dtype"]))
        interpreter.invoke()
        probs, score = (_dequantized(interpreter.get_tensor(d["index"]), d) for d in outputs)
        return probs, score

    return infer, meta, int(source["shape"][0]) == 1


def _dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    """An output as float32: an int8 model's quantized outputs by their scale and zero point."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(values.dtype, np.integer) and scale:
        return (values.astype(np.float32) - zero) * np.float32(scale)
    return values.astype(np.float32)
