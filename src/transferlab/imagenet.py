"""What a pretrained backbone's own ImageNet head says about images (no trained run needed)."""

from __future__ import annotations

from pathlib import Path

from transferlab.weights import create_backbone
from transferlab.zoo import get_spec


def imagenet_top5(
    images: list[Path], backbone: str = "efficientnet_lite0", weights: str | Path | None = None, k: int = 5
) -> list[dict]:
    """Top-k ImageNet-1k classes per image: ``[{"image", "top5": [{"index", "label", "prob"}]}]``."""
    spec = get_spec(backbone)
    model, _ = create_backbone(spec, weights=weights, num_classes=1000)  # fails fast when no weights
    import torch
    from timm.data import ImageNetInfo

    from transferlab.images import load_rgb
    from transferlab.transforms import imagenet_transform

    model.eval()
    transform = imagenet_transform(spec)
    info = ImageNetInfo()
    out = []
    with torch.inference_mode():
        for path in images:
            probs = model(transform(load_rgb(path)).unsqueeze(0)).softmax(-1)[0]
            top = probs.topk(k)
            out.append(
                {
                    "image": str(path),
                    "top5": [
                        {"index": int(i), "label": info.index_to_description(int(i)), "prob": round(float(p), 6)}
                        for p, i in zip(top.values, top.indices)
                    ],
                }
            )
    return out
