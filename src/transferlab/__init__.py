"""transferlab: transfer learning on images from ImageNet-pretrained backbones."""

from transferlab.errors import UserError
from transferlab.weights import create_backbone, find_weights
from transferlab.zoo import ZOO, BackboneSpec, get_spec

__all__ = ["ZOO", "BackboneSpec", "UserError", "create_backbone", "find_weights", "get_spec"]
