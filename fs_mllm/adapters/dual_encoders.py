"""Dual encoders: an image tower and a text tower meeting in one embedding space (zero-shot classification).

``get_image_features`` of every family here (transformers 5.x) returns a ModelOutput
(``BaseModelOutputWithPooling``; ALIGN: ``BaseModelOutputWithPoolingAndNoAttention``) whose
``pooler_output`` holds the image embeddings (B, D) that ``get_text_features`` embeddings are compared
with by cosine similarity. That embedding is the feature that is smoothed and certified (the paper's CLIP
classification setting), so the shared extract/rebuild of :class:`FamilyAdapter` applies unchanged: the
patched function returns the same output type with ``pooler_output`` = smoothed embeddings (B, D). The
other fields (``last_hidden_state``, ...) are per noisy copy and mean nothing for one image, so they are
not returned. ``feature_dim`` (what a booster's mapper sees) is the embedding dim.

Layouts:

- :class:`ClipStyleAdapter` (clip, metaclip_2, altclip, chinese_clip; OpenAI CLIP mean/std) and
  :class:`SiglipStyleAdapter` (siglip, align; mean = std = 0.5): pixel_values (B, 3, H, W).
  ALIGN's checkpoint processor (``EfficientNetImageProcessor``: rescale 1/127.5 with offset -1, no
  normalisation) maps [0,1] to 2x - 1, i.e. mean = std = 0.5 (see fs_mllm.normalization).
- :class:`Siglip2Adapter` (siglip2): patch rows (B, max_num_patches, P*P*3) zero-padded, with
  ``pixel_attention_mask`` (B, max_num_patches) and ``spatial_shapes`` (B, 2) in patches; an image is
  un-patchified to (3, h*P, w*P) so the noise lands on pixels and never on padding rows.

Only CLIP, MetaCLIP 2 and ChineseCLIP compute ``forward``'s image embeddings through
``get_image_features``; SigLIP, SigLIP 2, ALIGN and AltCLIP call their vision model directly, so their
``model(...)`` logits stay unsmoothed (``patch_model`` warns): use ``get_image_features`` or
``fs_mllm.certify_zero_shot`` for those.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    FamilyAdapter,
    register_adapter,
    unwrap_model,
    vision_patch_size,
)
from .lfm2_vl import from_patch_rows, to_patch_rows

# model_types whose forward() takes its image embeddings from get_image_features (checked by the tests)
FORWARD_USES_IMAGE_FEATURES = frozenset({"clip", "metaclip_2", "chinese_clip"})


@register_adapter
class ClipStyleAdapter(FamilyAdapter):
    """CLIP-style dual encoders: one (3, H, W) image per row, embeddings (B, D) in ``pooler_output``."""

    model_types = ("clip", "metaclip_2", "altclip", "chinese_clip")
    default_image_mean = OPENAI_CLIP_MEAN
    default_image_std = OPENAI_CLIP_STD
    generates = False

    def feature_dim(self, model: nn.Module) -> int:
        """The joint embedding dim: ``projection_dim`` where the image tower is projected, else the tower width."""
        config = unwrap_model(model).config
        projection = getattr(config, "projection_dim", None)
        return int(projection if projection is not None else config.vision_config.hidden_size)

    def on_patch(self, model: nn.Module) -> None:
        model_type = unwrap_model(model).config.model_type
        if model_type not in FORWARD_USES_IMAGE_FEATURES:
            warnings.warn(
                f"fs_mllm.patch_model: {type(unwrap_model(model)).__name__}.forward computes its image embeddings "
                "without get_image_features, so model(...) logits stay unsmoothed; use model.get_image_features "
                "(smoothed) or fs_mllm.certify_zero_shot for zero-shot classification",
                UserWarning,
                stacklevel=3,
            )


@register_adapter
class SiglipStyleAdapter(ClipStyleAdapter):
    """SigLIP and ALIGN: CLIP's layout with the processors' mean = std = 0.5 (pixels mapped to [-1, 1])."""

    model_types = ("siglip", "align")
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD


# SigLIP 2's processor flattens raster-order patches channel-last, the layout LFM2-VL and Gemma 4 share
siglip2_patchify = to_patch_rows  # (N, C, H, W) -> (N, h*w, P*P*C)
siglip2_unpatchify = from_patch_rows  # the first h*w rows of one image -> (C, h*P, w*P)


@register_adapter
class Siglip2Adapter(SiglipStyleAdapter):
    """SigLIP 2 (NaFlex): padded patch rows <-> (3, H, W) images; the mask and spatial shape travel with each image."""

    model_types = ("siglip2",)
    per_image_kwargs = ("spatial_shapes", "pixel_attention_mask")
    layout = "padded patch rows (B, max_patches, P*P*3) + spatial_shapes + pixel_attention_mask"

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        shapes = kwargs.get("spatial_shapes")
        if shapes is None:
            raise ValueError("spatial_shapes is required with SigLIP 2 pixel_values (pass the processor outputs)")
        if pixel_values.ndim != 3:
            raise ValueError(f"pixel_values of siglip2 must be (B, max_num_patches, P*P*3) patch rows, got shape "
                             f"{tuple(pixel_values.shape)}")
        mask = kwargs.get("pixel_attention_mask")
        patch = vision_patch_size(model)
        images = []
        for index, (grid_h, grid_w) in enumerate(torch.as_tensor(shapes).tolist()):
            real = grid_h * grid_w
            if real > pixel_values.shape[1]:
                raise ValueError(f"spatial_shapes[{index}] = ({grid_h}, {grid_w}) needs {real} patch rows, "
                                 f"pixel_values has {pixel_values.shape[1]}")
            if mask is not None:
                expected = torch.arange(mask.shape[-1], device=mask.device) < real
                if not torch.equal(mask[index].bool(), expected):
                    raise ValueError(f"pixel_attention_mask[{index}] does not mark the first {real} rows (spatial_shapes "
                                     f"{grid_h}x{grid_w}) as the image and the rest as padding")
            images.append(siglip2_unpatchify(pixel_values[index, :real], grid_h, grid_w, patch))
        return images

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        patch = vision_patch_size(model)
        rows = siglip2_patchify(images, patch)
        count, real = rows.shape[0], rows.shape[1]
        mask = extra.get("pixel_attention_mask")
        length = real if mask is None else int(mask.shape[-1])
        rows = torch.nn.functional.pad(rows, (0, 0, 0, length - real))  # zero padding rows, as the processor pads
        new_mask = (torch.arange(length, device=images.device) < real).to(torch.int32 if mask is None else mask.dtype)
        grid = torch.tensor([[images.shape[-2] // patch, images.shape[-1] // patch]] * count, device=images.device)
        return rows, {"spatial_shapes": grid, "pixel_attention_mask": new_mask.repeat(count, 1)}
