"""Families fs_mllm refuses, each with the reason ``patch_model`` gives (instead of a bare "unsupported").

A family lands here when feature-space smoothing has no sound meaning for it, when its image path has
no hook point the patch can wrap without changing ``forward``, when one picture reaches the image
function as two paired pixel inputs (the adapter contract has one pixel input per image), when smoothing
would noise padding, when its pixel layout has no adapter yet, or when no tiny model of it could be
built and run offline (fs_mllm registers no family untested).
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

refuse_family("apertus1p5", _DISCRETE.replace("VQ-VAE codes", "codes of its image tokenizer (get_image_tokens), embedded "
                                                               "with the text embedding table,"))
refuse_family("blip", "BlipForConditionalGeneration feeds the vision output to its text decoder from forward()/generate() "
                      "directly; get_image_features exists only on the contrastive BlipModel, off the generate path")
refuse_family("kosmos-2.5", "its pixel input is flattened_patches, not pixel_values: Pix2Struct-style rows whose first two "
                            "values are row/column ids, zero-padded to max_patches; noise would have to skip the ids and "
                            "the padding rows, and no adapter does that yet")
refuse_family("fuyu", "there is no vision encoder: get_image_features is one Linear over raw patch rows that the processor "
                      "cuts from an image padded (padding_value 1.0) up to whole patches, and the rows carry no mask, so "
                      "smoothing would noise the padding pixels of the edge patches")
refuse_family("molmo2", "image_token_pooling pools each image token from patches of several overlapping crops (global "
                        "view + tiles) in one call, so one image's pixels are several paired pixel rows; no adapter yet")
refuse_family("t5gemma2", "an encoder-decoder: generate() reaches the encoder's own get_image_features (T5Gemma2Encoder), "
                          "not the outer model's one that fs_mllm would wrap; no adapter hooks the encoder yet")
refuse_family("diffusion_gemma", "a block-diffusion model (DiffusionGemmaForBlockDiffusion with its own generation mixin), "
                                 "not an autoregressive generate(); fs_mllm's patch and certificates are not checked on it, "
                                 "no adapter yet")
refuse_family("dots3_note", "no tiny config can be built offline: its text config's default per_layer_config overrides layers "
                            "25-41, which a 2-layer test config rejects; not registered untested")
refuse_family("exaone4_5", "no tiny config could be built offline (a hidden-32, 2-layer text config fails in its attention "
                           "with mismatched head counts); not registered untested")
refuse_family("ernie4_5_vl_moe", "no tiny model could be run offline: its 3-D position ids need the processor's token-type "
                                 "layout around each image, which the generic test prompt does not reproduce; not "
                                 "registered untested (its patch rows are the Qwen2-VL layout with temporal patch 1)")

_NOT_YET = "its pixel layout needs its own adapter, not written yet: {layout}"
refuse_family("gemma4_unified", _NOT_YET.format(
    layout="padded rows of raw merged patches ((patch_size*pooling_kernel_size)^2*3 values each) fed to an encoder-free "
           "embedder with image_position_ids; the Gemma 4 adapter's patch_size rows do not describe them"))
refuse_family("granite4_vision", _NOT_YET.format(
    layout="LLaVA-NeXT-style (B, crops, 3, H, W) + image_sizes, with deepstack_layer_map sending several vision layers "
           "through their own projectors into different decoder layers"))
refuse_family("granite_docling", _NOT_YET.format(
    layout="Idefics3-style sub-images with pixel_attention_mask plus a tile_fine_mask selecting fine tiles"))
for _family in ("minicpm_ocr", "minicpmv4_6", "minicpmv4_7"):
    refuse_family(_family, _NOT_YET.format(
        layout="slices of each image packed into patch strips described by target_sizes (MiniCPM-V layout)"))
refuse_family("nemotron_h_omni", _NOT_YET.format(layout="flattened patch rows described by image_grid_hw"))
for _family in ("paddleocr_vl", "muse_glimmer", "muse_spark"):
    refuse_family(_family, _NOT_YET.format(layout="raster (3, P, P) patch rows + image_grid_thw without merge blocks "
                                                  "(PaddleOCR-VL passes them un-flattened)"))
refuse_family("video_llama_3", _NOT_YET.format(
    layout="patch rows + image_grid_thw plus a per-image image_merge_sizes kwarg"))
refuse_family("inkling_mm_model", _NOT_YET.format(layout="video-shaped (B, T, ...) pixel clips fed to its vision tower; the "
                                                         "layout of a still image was not established"))
for _family in ("inkling2", "inkling2_loop"):
    refuse_family(_family, _NOT_YET.format(layout="channel-last (rows, columns, P, P, C) patches + image_grid_thw"))
