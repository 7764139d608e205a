"""Gemma 4 (``gemma4``): channel-last patch rows padded to max_patches + positions.

``Gemma4ImageProcessor`` cuts each resized image (3, H, W) into P x P patches in raster order, flattens
each channel-last (the SigLIP2 layout, see :mod:`fs_mllm.adapters.lfm2_vl`) and pads to ``max_patches``
rows; ``image_position_ids`` (B, max_patches, 2) gives each row's (x, y) patch position, (-1, -1) for
padding. The model needs the padded length (it derives its pooling from it), so a smoothed image keeps
its row count: one image in the shared layout is its un-patched (3, h*P, w*P) picture, its position
row travels with it, and the padding rows stay zero (never noised). The processor does not normalise
(``do_normalize=False``): the default mean/std are 0 and 1, so pixels are [0, 1] values.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilyAdapter, register_adapter, vision_patch_size
from .lfm2_vl import from_patch_rows, to_patch_rows


@register_adapter
class Gemma4Adapter(FamilyAdapter):
    """Gemma 4: padded channel-last patch rows <-> (3, H, W) images; image_position_ids travel with each."""

    model_types = ("gemma4",)
    default_image_mean = (0.0, 0.0, 0.0)
    default_image_std = (1.0, 1.0, 1.0)
    per_image_kwargs = ("image_position_ids",)
    layout = "padded patch rows (B, max_patches, P*P*3) + image_position_ids"

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        positions = kwargs.get("image_position_ids")
        if positions is None:
            raise ValueError(f"image_position_ids is required with {self.name} pixel_values (pass the processor outputs)")
        if pixel_values.ndim != 3:
            raise ValueError(f"{self.name} pixel_values must be (batch, patches, P*P*3), got shape {tuple(pixel_values.shape)}")
        patch = vision_patch_size(model)
        images = []
        for rows, position in zip(pixel_values, torch.as_tensor(positions)):
            real = position[(position != -1).all(-1)]
            w, h = int(real[:, 0].max()) + 1, int(real[:, 1].max()) + 1
            images.append(from_patch_rows(rows, h, w, patch))
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch = vision_patch_size(model)
        count, h, w = images.shape[0], images.shape[-2] // patch, images.shape[-1] // patch
        rows = to_patch_rows(images, patch)
        positions = extra.get("image_position_ids")
        if positions is None:  # no padding: the raster (x, y) grid
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            positions = torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(count, -1, -1)
        positions = torch.as_tensor(positions, device=images.device)
        padding = positions.shape[1] - rows.shape[1]
        if padding > 0:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        return rows, {"image_position_ids": positions}
