"""LFM2-VL (``model_type="lfm2_vl"``): SigLIP2 NaFlex patch rows, padded per image.

``Lfm2VlImageProcessor`` cuts each resized image (3, H, W) into P x P patches in raster order and
flattens each patch channel-last (P, P, C), giving (h*w, P*P*3) rows per image, padded to the batch's
``max_patches``; ``spatial_shapes`` (B, 2) holds each image's (h, w) in patches and
``pixel_attention_mask`` (B, max_patches) its real rows. One image in the shared layout is its
un-patched (3, h*P, w*P) picture, so noise never lands on padding rows; images of the same size are
smoothed together with their padding dropped. Processor default mean/std are 0.5.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter, vision_patch_size


def to_patch_rows(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, h*w, P*P*C): raster-order patches flattened channel-last (SigLIP2 / Gemma 4 processors)."""
    count, channels, height, width = images.shape
    h, w = height // patch, width // patch
    if h * patch != height or w * patch != width:
        raise ValueError(f"images of size {height}x{width} do not tile into {patch}px patches; resize first")
    return images.reshape(count, channels, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(count, h * w, -1)


def from_patch_rows(rows: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """The first h*w rows (h*w + padding, P*P*C) of one image -> (C, h*P, w*P), the inverse of to_patch_rows."""
    patches = rows[: h * w].reshape(h, w, patch, patch, -1)
    return patches.permute(4, 0, 2, 1, 3).reshape(-1, h * patch, w * patch)


@register_adapter
class Lfm2VlAdapter(FamilyAdapter):
    """LFM2-VL: channel-last patch rows <-> (3, H, W) images; spatial_shapes / mask rows travel with each."""

    model_types = ("lfm2_vl",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    per_image_kwargs = ("spatial_shapes", "pixel_attention_mask")
    layout = "padded patch rows (B, max_patches, P*P*3) + spatial_shapes + pixel_attention_mask"

    @staticmethod
    def _shapes(kwargs: dict) -> list[list[int]]:
        shapes = kwargs.get("spatial_shapes")
        if shapes is None:
            raise ValueError("spatial_shapes is required with lfm2_vl pixel_values (pass the processor outputs)")
        return torch.as_tensor(shapes).tolist()

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        if pixel_values.ndim != 3:
            raise ValueError(f"lfm2_vl pixel_values must be (batch, patches, P*P*3), got shape {tuple(pixel_values.shape)}")
        patch = vision_patch_size(model)
        return [from_patch_rows(rows, h, w, patch) for rows, (h, w) in zip(pixel_values, self._shapes(kwargs))]

    def per_image_rows(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> dict[str, list]:
        shapes = self._shapes(kwargs)
        rows = {"spatial_shapes": [torch.tensor(shape) for shape in shapes]}
        if kwargs.get("pixel_attention_mask") is not None:  # the real rows only (padding is dropped with the rows)
            rows["pixel_attention_mask"] = [mask[: h * w] for mask, (h, w) in zip(torch.as_tensor(kwargs["pixel_attention_mask"]), shapes)]
        return rows

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch = vision_patch_size(model)
        count, h, w = images.shape[0], images.shape[-2] // patch, images.shape[-1] // patch
        rows = to_patch_rows(images, patch)
        shapes = extra.get("spatial_shapes")
        shapes = torch.tensor([[h, w]] * count, device=images.device) if shapes is None else torch.as_tensor(shapes, device=images.device)
        mask = extra.get("pixel_attention_mask")
        mask = torch.ones(count, h * w, dtype=torch.bool, device=images.device) if mask is None else torch.as_tensor(mask, device=images.device)
        return rows, {"spatial_shapes": shapes, "pixel_attention_mask": mask}
