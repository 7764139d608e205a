"""Images in and out of [0,1] tensors: the one place that knows how a PIL/array image becomes model pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["to_tensor01"]


def to_tensor01(image: Any, size: int) -> torch.Tensor:
    """A PIL/array image as a (3, size, size) float tensor in [0,1] (bilinear, antialiased)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)
