"""Image <-> tensor conversion shared by the model, the data pipeline and the index job."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> float tensor (3, size, size) in [-1, 1]; resized if needed."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
