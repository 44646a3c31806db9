"""A trained run as a timm folder (``export --format hf``): config.json, model.safetensors and a model card,
which ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads without transferlab."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from transferlab.data.images import Preprocess
from transferlab.errors import UserError
from transferlab.files import FILE_MODE, atomic_write
from transferlab.inference.predictor import Judgement
from transferlab.model.network import TransferNet


def save_hf(
    net: TransferNet, config: dict, folder: Path, images: list, reference: Judgement, val: list, checks: dict
) -> dict:
    """A timm folder of the run: its parity report (the folder's logits, through timm alone, against the trained
    model on the same input rows; no "none of these" score), in the model card."""
    import timm
    from timm.models import save_for_hf

    from transferlab.model.network import logits_to_probabilities

    spec, classes = net.spec, list(config["classes"])
    linear = net.head[-1]
    weight, bias = linear.weight.detach(), linear.bias.detach()
    if weight.shape[0] == 1 and not net.multi_label:  # one sigmoid logit z for two classes: softmax([0, z])
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    model = timm.create_model(spec.arch, pretrained=False, num_classes=len(classes), **spec.timm_args)
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    state = {**net.backbone.state_dict(), f"{classifier}.weight": weight, f"{classifier}.bias": bias}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"cannot write {spec.arch} as a timm folder ({str(e).splitlines()[0][:120]})") from None
    resize = config["resize"]
    data_config = {
        "input_size": (3, config["image_size"], config["image_size"]), "interpolation": spec.interpolation,
        "mean": tuple(spec.mean), "std": tuple(spec.std), "crop_pct": spec.crop_pct if resize == "crop" else 1.0,
        "crop_mode": "center" if resize == "crop" else "squash",
    }  # fmt: skip
    model_config = {"label_names": classes, "multi_label": bool(net.multi_label)}
    save_for_hf(model.eval(), str(folder), model_config=model_config, safe_serialization=True, data_config=data_config)
    for f in folder.iterdir():  # safetensors writes 0600: the umask's mode, as for every file a run has
        os.chmod(f, FILE_MODE)
    # the folder as a timm user loads it, on the rows the trained model saw
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    prep = Preprocess.from_meta(config)
    probs = np.zeros((0, len(classes)), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            rows = torch.from_numpy(np.stack([prep.normalized(p) for p in images[i : i + 32]]))
            probs = np.concatenate([probs, logits_to_probabilities(loaded(rows), net.multi_label).numpy()])
    report = checks["parity"](reference, (probs, reference[1]), val, config)
    del report["max_score_difference"]  # the folder has no score
    if report["max_prob_difference"] > checks["tolerance"] or report["agreement"] < checks["min_agreement"]:
        raise UserError(
            f"the timm folder is not written: it gives the trained model's answer on {report['agreement']:.1%} of "
            f"{report['images']} validation images and differs by up to {report['max_prob_difference']:.2e}"
        )
    atomic_write(folder / "README.md", model_card(spec, config, report, data_config))
    atomic_write(folder / "transferlab.json", json.dumps({**checks["meta"], "parity": report}, indent=2))
    return report


def model_card(spec, config: dict, report: dict, data_config: dict) -> str:
    classes = list(config["classes"])
    activation = "a sigmoid per class (several labels per image)" if config.get("multi_label") else "a softmax"
    return f"""---
library_name: timm
tags: [image-classification, timm, transferlab]
---
# {spec.arch} fine-tuned by transferlab

{len(classes)} classes: {", ".join(classes)}. Trained from {spec.name} ({spec.weights}) at {config["image_size"]} px.

| | |
|---|---|
| validation images | {report["images"]} |
| accuracy of this folder | {report["accuracy"]:.4f} |
| accuracy of the trained run | {report["trained_accuracy"]:.4f} |
| same answer as the trained run | {report["agreement"]:.2%} |
| largest probability difference | {report["max_prob_difference"]:.2e} |

```python
import timm, torch
from PIL import Image

model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)
x = transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)
probs = model(x).softmax(-1)  # {activation}
print(model.pretrained_cfg["label_names"][probs.argmax().item()])
```

Input: {data_config["input_size"][1]} px, {data_config["interpolation"]}, mean {list(data_config["mean"])},
std {list(data_config["std"])}, {data_config["crop_mode"]} (crop_pct {data_config["crop_pct"]}). The model gives
logits: apply {activation}. transferlab's "none of these" score is in its ONNX, TorchScript and TFLite
exports, not here.
"""
