"""Families fs_mllm refuses, each with the reason ``patch_model`` gives (instead of a bare "unsupported").

A family lands here when feature-space smoothing has no sound meaning for it, when its image path has
no hook point the patch can wrap without changing ``forward``, or when one picture reaches the image
function as two paired pixel inputs (the adapter contract has one pixel input per image).
"""

from __future__ import annotations

from .base import refuse_family

_DISCRETE = ("its images enter the language model as discrete VQ-VAE codes (image tokens), not continuous features; "
             "averaging noisy copies does not define the smoothed encoder F, so no FCSB certificate applies")

refuse_family("chameleon", _DISCRETE)
refuse_family("emu3", _DISCRETE)
refuse_family("ovis2", "its visual tokenizer returns a distribution over a visual vocabulary plus visual_indicator_features "
                       "shared by every image of the call, so one image's features cannot be smoothed on their own")
refuse_family("blip-2", "the Q-Former output feeds the decoder from forward(); there is no get_image_features on the "
                        "generate path to wrap")
refuse_family("instructblip", "the Q-Former output (conditioned on the prompt) feeds the decoder from forward(); there is "
                              "no get_image_features on the generate path to wrap")

_TWO_VIEWS = ("each picture reaches get_image_features as two pixel inputs, {views}, paired row by row; an fs_mllm "
              "adapter describes one pixel input per image, so these families are not supported yet")
refuse_family("deepseek_vl_hybrid", _TWO_VIEWS.format(views="pixel_values and high_res_pixel_values (two resolutions)"))
for _family in ("deepseek_ocr2", "step3p7", "unlimited_ocr"):
    refuse_family(_family, _TWO_VIEWS.format(views="a global view (pixel_values) and local crops (pixel_values_local)"))
