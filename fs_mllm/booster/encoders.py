"""The frozen encoders a booster is trained around: a Hugging Face vision model as [0,1] pixels -> tokens."""


from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn



class PixelEncoder(nn.Module):
    """Wrap a Hugging Face vision model as encoder([0,1] pixels) -> image features.

    Normalises with the processor mean/std, returns ``last_hidden_state`` without the first
    ``drop_tokens`` tokens (e.g. 1 to drop the CLS token and keep all patch tokens).
    """

    def __init__(self, model: nn.Module, image_mean: Sequence[float], image_std: Sequence[float], drop_tokens: int = 1) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.drop_tokens = drop_tokens

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        x = (pixels01.float() - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=x.to(dtype)).last_hidden_state[:, self.drop_tokens:]


def freeze(module: Any) -> Any:
    """Frozen means no parameter receives gradients and dropout is off; gradients still flow to inputs."""
    if isinstance(module, nn.Module):
        module.eval()
        module.requires_grad_(False)
    return module



def build_encoder(name: str) -> tuple[PixelEncoder, str]:
    """The frozen encoder ([0,1] pixels -> patch tokens) and its id for the booster config."""
    if name == "dinov2":
        from ..models import load_dinov2
        from ..models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD

        return freeze(PixelEncoder(load_dinov2(), IMAGENET_MEAN, IMAGENET_STD, drop_tokens=1)), "dinov2-vits14-imgfocus/patch_tokens"
    from transformers import AutoImageProcessor, AutoModel

    from ..hub.io import load_safetensors_model

    processor = AutoImageProcessor.from_pretrained(name)
    model = load_safetensors_model(AutoModel, name)  # never pickle weights
    return freeze(PixelEncoder(model, processor.image_mean, processor.image_std, drop_tokens=1)), f"{name}/patch_tokens"
