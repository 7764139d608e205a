"""Idefics2, Idefics3 and SmolVLM: several sub-images per prompt, padded, with a pixel mask.

``pixel_values`` is (B, N_max, 3, H, W): the sub-images of prompt b (the processor's crops of each
picture plus the global view) padded with all-zero sub-images up to the batch's N_max, and
``pixel_attention_mask`` (B, N_max, H, W) marks each sub-image's real pixels (images are padded
bottom/right to the batch's largest size). The model drops the all-zero sub-images and returns one
feature tensor per *prompt* (its real sub-images' features concatenated).

One image in the shared layout is one real sub-image (3, H, W), smoothed with its own noise; its
mask row travels with it. Padding sub-images are never noised (they would stop being all-zero and
become real), and neither are the padded pixels of a real sub-image (``pixel_attention_mask`` 0): they are
set back to the processor's zeros after the noise, since a patch with some real pixels is encoded whole. ``regroup`` concatenates the
smoothed sub-image features back per prompt, the container the original returns.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter


def _real(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: which sub-images are real (the model's own test: not all exactly zero)."""
    return (pixel_values != 0).flatten(2).any(-1)


@register_adapter
class IdeficsAdapter(FamilyAdapter):
    """Idefics2 / Idefics3 / SmolVLM: image = one real sub-image (3, H, W) with its pixel_attention_mask row."""

    model_types = ("idefics2", "idefics3", "smolvlm")
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    per_image_kwargs = ("pixel_attention_mask",)
    layout = "(B, N_max, 3, H, W) padded sub-images + pixel_attention_mask; image = one real sub-image"

    def _check(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 5:
            raise ValueError(f"{self.name} pixel_values must be (batch, sub_images, 3, H, W), got shape {tuple(pixel_values.shape)}")

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        self._check(pixel_values)
        return list(pixel_values[_real(pixel_values)])

    def per_image_rows(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> dict[str, list]:
        mask = kwargs.get("pixel_attention_mask")
        if mask is None:
            return {}
        self._check(pixel_values)
        return {"pixel_attention_mask": list(torch.as_tensor(mask)[_real(pixel_values)])}

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        mask = extra.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones((images.shape[0],) + tuple(images.shape[-2:]), dtype=torch.bool, device=images.device)
        mask = torch.as_tensor(mask, device=images.device)
        # padded pixels back to the processor's zeros: noise must not land there (a patch with some real pixels is
        # encoded whole, so noise on its padded pixels would reach the features)
        images = images * mask.unsqueeze(1).to(images.dtype)
        return images.unsqueeze(1), {"pixel_attention_mask": mask.unsqueeze(1)}

    def regroup(self, per_image: list[torch.Tensor], call: Optional[dict]) -> list[torch.Tensor]:
        """Sub-image features concatenated per prompt, as the model returns them."""
        if call is None:
            return per_image
        counts = _real(call["pixel_values"]).sum(1).tolist()
        grouped, start = [], 0
        for count in counts:
            pieces = per_image[start:start + count]
            grouped.append(torch.cat(pieces) if pieces else per_image[0].new_zeros((0, per_image[0].shape[-1])))
            start += count
        return grouped
