"""Mllama (Llama 3.2 Vision, ``model_type="mllama"``): the vision states feed cross-attention, not tokens.

Mllama has no ``get_image_features``: ``MllamaModel.forward`` calls ``vision_model(pixel_values,
aspect_ratio_ids, aspect_ratio_mask)`` at prefill and projects its ``last_hidden_state`` (B, images,
tiles, T, D_vision) into the cross-attention states of the decoder. The hook point is therefore the
vision model's ``forward`` (wrapped on the instance, like ``get_image_features`` elsewhere); generate
still encodes once per prefill (later steps reuse the cross-attention cache).

pixel_values is (B, max_images, max_tiles, 3, H, W) with ``aspect_ratio_ids`` (B, max_images; 0 marks a
padding image slot) and ``aspect_ratio_mask`` (B, max_images, max_tiles; 1 for the real tiles, first).
One image in the shared layout is its real tiles (tiles, 3, H, W): padding tiles are re-added as the
processor's all-zero tiles, never noised (Mllama's vision attention lets real tokens attend to them, so
noised padding would change the real tiles' states); its ids/mask rows travel with it. Padding image slots are not smoothed: they
get zero states, and the processor's ``cross_attention_mask`` already hides them from every token.
The smoothed (and certified) features are the vision output of the image's *real* tiles, before the
projector (like Llama 4): padding tiles' states never reach the decoder (cross_attention_mask hides
them), so they are left out of the smoothed vector (``call_features``) and returned as zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, FamilyAdapter, register_adapter, unwrap_model


def _real(aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(aspect_ratio_ids) != 0


@register_adapter
class MllamaAdapter(FamilyAdapter):
    """Mllama: hook = vision_model.forward; image = one (tiles, 3, H, W) tile stack with its aspect-ratio rows."""

    model_types = ("mllama",)
    default_image_mean = IMAGENET_STANDARD_MEAN
    default_image_std = IMAGENET_STANDARD_STD
    feature_function = "forward"
    video_function = ""
    per_image_kwargs = ("aspect_ratio_ids", "aspect_ratio_mask")
    feature_fields = ("last_hidden_state",)
    layout = "(B, images, tiles, 3, H, W) + aspect_ratio_ids/mask; hook = vision_model.forward (cross-attention states)"

    def feature_owner(self, model: nn.Module) -> nn.Module:
        hf_model = unwrap_model(model)
        inner = getattr(hf_model, "model", hf_model)
        vision = getattr(inner, "vision_model", None)
        if vision is None:
            raise ValueError(f"model: {type(hf_model).__name__} has no vision_model; cannot patch it")
        return vision

    def feature_dim(self, model: nn.Module) -> int:
        return int(unwrap_model(model).config.vision_config.vision_output_dim)

    def _ids(self, kwargs: dict) -> torch.Tensor:
        ids = kwargs.get("aspect_ratio_ids")
        if ids is None:
            raise ValueError("aspect_ratio_ids is required with mllama pixel_values (pass the processor outputs)")
        return torch.as_tensor(ids)

    def _tile_counts(self, pixel_values: torch.Tensor, kwargs: dict) -> list[int]:
        """Real tiles of each real image slot (``aspect_ratio_mask`` marks them first; all tiles without it)."""
        real = _real(self._ids(kwargs))
        mask = kwargs.get("aspect_ratio_mask")
        if mask is None:
            return [pixel_values.shape[2]] * int(real.sum())
        return [int(row.sum()) for row in torch.as_tensor(mask)[real]]

    def images_from_inputs(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        """Each real image slot's real tiles (tiles, 3, H, W): padding tiles are not image pixels and get no noise
        (they do reach the real tiles' states: in Mllama's vision attention real tokens attend to padding tokens)."""
        if pixel_values.ndim != 6:
            raise ValueError(f"mllama pixel_values must be (batch, images, tiles, 3, H, W), got shape {tuple(pixel_values.shape)}")
        stacks = pixel_values[_real(self._ids(kwargs))]
        return [stack[:count] for stack, count in zip(stacks, self._tile_counts(pixel_values, kwargs))]

    def per_image_rows(self, model: nn.Module, pixel_values: torch.Tensor, kwargs: dict) -> dict[str, list]:
        real = _real(self._ids(kwargs))
        rows = {"aspect_ratio_ids": list(self._ids(kwargs)[real])}
        if kwargs.get("aspect_ratio_mask") is not None:
            rows["aspect_ratio_mask"] = list(torch.as_tensor(kwargs["aspect_ratio_mask"])[real])
        return rows

    def inputs_from_images(self, model: nn.Module, images: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        """(N, tiles, 3, H, W) real tiles -> the vision model's (N, 1, max_tiles, 3, H, W), padded with all-zero
        tiles as the processor pads them, and the matching aspect_ratio_mask."""
        if images.ndim != 5:
            raise ValueError(f"mllama images must be (N, tiles, 3, H, W), got shape {tuple(images.shape)}")
        count, tiles = images.shape[:2]
        ids = extra.get("aspect_ratio_ids")
        if ids is None:
            raise ValueError("aspect_ratio_ids (one per image) is required for mllama inputs")
        mask = extra.get("aspect_ratio_mask")
        max_tiles = int(unwrap_model(model).config.vision_config.max_num_tiles) if mask is None else int(torch.as_tensor(mask).shape[-1])
        if tiles > max_tiles:
            raise ValueError(f"mllama images have {tiles} tiles, more than max_num_tiles={max_tiles}")
        if mask is None:
            mask = (torch.arange(max_tiles, device=images.device) < tiles).long().expand(count, -1)
        pixel_values = torch.nn.functional.pad(images, (0, 0, 0, 0, 0, 0, 0, max_tiles - tiles))
        return pixel_values.unsqueeze(1), {"aspect_ratio_ids": torch.as_tensor(ids, device=images.device).reshape(count, 1),
                                           "aspect_ratio_mask": torch.as_tensor(mask, device=images.device).reshape(count, 1, max_tiles)}

    def extract_features(self, output, count: int) -> torch.Tensor:
        states = output["last_hidden_state"]  # (count, 1, tiles, T, D)
        return states.reshape(count, -1, states.shape[-1])

    def call_features(self, output, count: int, inputs: dict) -> torch.Tensor:
        """The states of each image's real tiles only, (count, real_tiles*T, D).

        Padding tiles (``aspect_ratio_mask`` 0) are encoded too, but the processor's cross_attention_mask
        hides their states from every token: they never reach the decoder, so they are not part of the
        smoothed (and certified) feature vector. Images of one call share their tile count (grouped by
        their aspect-ratio rows); a call mixing counts keeps the largest and zeroes each image's padding.
        """
        states = output["last_hidden_state"]  # (count, 1, tiles, T, D)
        mask = inputs.get("aspect_ratio_mask")
        if mask is None:
            return self.extract_features(output, count)
        mask = torch.as_tensor(mask, device=states.device).reshape(count, -1).bool()
        kept = int(mask.sum(-1).max())
        states = states.reshape((count,) + tuple(states.shape[-3:]))[:, :kept]
        states = states * mask[:, :kept, None, None].to(states.dtype)
        return states.reshape(count, -1, states.shape[-1])

    def regroup(self, per_image: list[torch.Tensor], call: Optional[dict]) -> torch.Tensor:
        """(B, images, tiles, T, D) states with the smoothed images' real tiles in their slots, zeros in padding
        tiles and padding slots (both hidden from the decoder by cross_attention_mask)."""
        pixel_values = call["pixel_values"]
        batch, slots, tiles = pixel_values.shape[:3]
        real = _real(self._ids(call)).to(pixel_values.device)
        mask = call.get("aspect_ratio_mask")
        counts = ([tiles] * len(per_image) if mask is None
                  else torch.as_tensor(mask).to(pixel_values.device)[real].reshape(len(per_image), -1).sum(-1).tolist())
        tokens, dim = per_image[0].shape[0] // max(counts[0], 1), per_image[0].shape[-1]
        states = per_image[0].new_zeros((batch, slots, tiles, tokens, dim))
        full = states[real]
        for index, (features, count) in enumerate(zip(per_image, counts)):
            full[index, :count] = features.reshape(-1, tokens, dim)[:count]
        states[real] = full
        return states
