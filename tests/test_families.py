"""The conformance test: every registered generative family (``fs_mllm.adapters.ADAPTERS``) passes the same checks.

Parametrised from the adapter registry, so registering an adapter enrols its family; a registered family
without a tiny builder in ``fs_mllm.testing.FAMILIES`` fails here. Each family is a tiny random-weight
instance of its real transformers classes (hidden 32, 2 layers, 16-64 px images).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from fs_mllm import testing as tiny_models
from fs_mllm.adapters import ADAPTERS, REFUSED, family_table, get_adapter
from fs_mllm.certify import certify_model
from fs_mllm.patching import is_patched, patch_model, unpatch_model

# the generative families (dual encoders have no generate(): tests/test_dual_encoders.py is theirs)
FAMILIES = sorted(family for family, adapter in ADAPTERS.items() if adapter.generates)
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.3, 0.35]
N = 3  # noisy copies per image inside generate


def build(family: str, **kwargs):
    if family not in tiny_models.FAMILIES:
        pytest.fail(f"{family} is registered in fs_mllm.adapters but fs_mllm.testing.FAMILIES has no tiny builder for it")
    if family in tiny_models.NEEDS_TIMM:
        tiny_models.require_timm()
    return tiny_models.FAMILIES[family](**kwargs)


def patch(model, **kwargs):
    return patch_model(model, image_mean=MEAN, image_std=STD, **kwargs)


def feature_call(model, inputs: dict, **extra):
    """The image-feature function generate() calls, with the inputs it would pass (by signature)."""
    adapter = get_adapter(model)
    function = getattr(adapter.feature_owner(model), adapter.feature_function)
    names = set(inspect.signature(function).parameters)
    with torch.no_grad():
        return function(**{k: v for k, v in inputs.items() if k in names}, **extra, return_dict=True)


def feature_rows(model, output) -> torch.Tensor:
    """Every feature vector of an output (all parts, e.g. DeepStack levels too) as (rows, D) float32."""
    rows = []
    for part in get_adapter(model).feature_parts(output):
        for piece in ([part] if isinstance(part, torch.Tensor) else part):
            rows.append(piece.reshape(-1, piece.shape[-1]).float())
    return torch.cat(rows)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


class VisionRows:
    """Rows (first dim of the pixel input) of every vision-encoder call."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        self.handle = tiny_models.vision_module(model).register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values", next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        self.rows.append(pixels.shape[0])


def image_kwargs(model, inputs: dict) -> dict:
    """pixel_values and the family's per-image kwargs (what certify_model / the adapter take)."""
    adapter = get_adapter(model)
    return {k: v for k, v in inputs.items() if k == "pixel_values" or k in adapter.per_image_kwargs}


def test_every_family_has_a_builder():
    assert len(FAMILIES) >= 30
    missing = sorted(set(FAMILIES) - set(tiny_models.FAMILIES))
    assert not missing, f"registered families without a tiny builder in fs_mllm.testing.FAMILIES: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_generate_encodes_n_copies_once(family):
    model, inputs = build(family)
    clean = feature_rows(model, feature_call(model, inputs))
    calls = VisionRows(model)
    feature_call(model, inputs)
    clean_calls = list(calls.rows)
    patch(model, sigma=0.25, n_samples=N)
    calls.rows.clear()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]  # Florence-2: decoder start token
    assert out.shape == (inputs["input_ids"].shape[0], prompt + 3)
    # the vision encoder runs once per generate (prefill), on N noisy copies of every image
    assert calls.rows == [N * rows for rows in clean_calls], (calls.rows, clean_calls)
    smoothed = feature_rows(model, feature_call(model, inputs))
    assert smoothed.shape == clean.shape
    assert cosine(smoothed, clean) < 0.9999  # sigma 0.25 changes the features


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_sigma_gives_the_unpatched_tokens_and_unpatch_is_exact(family):
    model, inputs = build(family)
    owner = get_adapter(model).feature_owner(model)
    before = dict(owner.__dict__)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    patch(model, sigma=1e-4, n_samples=2)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    unpatch_model(model)
    assert not is_patched(model) and owner.__dict__.keys() == before.keys()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_certify(family):
    model, inputs = build(family)
    adapter = get_adapter(model)
    pixel_inputs = image_kwargs(model, inputs)
    count = len(adapter.images_from_inputs(model, inputs["pixel_values"], pixel_inputs))
    patch(model, sigma=0.1, n_samples=2)
    certificates = certify_model(model, pixel_inputs, n=4, alpha=0.1, radius=0.01)
    assert len(certificates) == count
    for certificate in certificates:
        assert 0 <= certificate.score_lower <= certificate.score_mean <= 1
        assert certificate.bound == pytest.approx(certificate.fcsb(0.01))


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_roundtrip(family):
    """[0,1] pixels <-> model inputs through the adapter, exactly and differentiably (attacks use this)."""
    model, inputs = build(family)
    adapter = get_adapter(model)
    extra = {k: v for k, v in image_kwargs(model, inputs).items() if k != "pixel_values"}
    pixels = adapter.model_inputs_to_pixels(model, inputs["pixel_values"], MEAN, STD, **extra)
    rows = {k: torch.stack(v) for k, v in adapter.per_image_rows(model, inputs["pixel_values"], extra).items()}
    back = adapter.pixels_to_model_inputs(model, pixels, MEAN, STD, **rows)
    real = adapter.images_from_inputs(model, inputs["pixel_values"], extra)
    again = adapter.images_from_inputs(model, back["pixel_values"], {k: back[k] for k in back if k != "pixel_values"})
    assert len(real) == len(again)
    for a, b in zip(real, again):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    images = pixels.clone().requires_grad_(True)
    adapter.pixels_to_model_inputs(model, images, MEAN, STD, **rows)["pixel_values"].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance(family):
    """One image's smoothed features do not depend on its neighbour or its position in the call."""
    model, inputs = build(family)
    adapter = get_adapter(model)
    extra = {k: v for k, v in image_kwargs(model, inputs).items() if k != "pixel_values"}
    images = adapter.images_from_inputs(model, inputs["pixel_values"], extra)
    rows = {k: torch.stack(v) for k, v in adapter.per_image_rows(model, inputs["pixel_values"], extra).items()}
    first, other = images[0], images[1] + 0.5  # a different neighbour of the same shape
    patch(model, sigma=0.25, n_samples=N)

    def smoothed(stack: list[torch.Tensor]) -> list[torch.Tensor]:
        pixel_values, kwargs = adapter.inputs_from_images(model, torch.stack(stack), {k: v[:1].repeat_interleave(len(stack), 0)
                                                                                     for k, v in rows.items()})
        output = feature_call(model, {"pixel_values": pixel_values, **kwargs})
        return list(adapter.extract_features(output, len(stack)))

    alone = smoothed([first])[0]
    scale = alone.abs().max().item()  # tiny models' feature scales differ by orders of magnitude
    torch.testing.assert_close(smoothed([first, other])[0], alone, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(smoothed([other, first])[1], alone, atol=1e-5 * scale, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# family-specific behaviour the shared checks cannot see
# ---------------------------------------------------------------------------------------------

def test_qwen3_vl_deepstack_smoothed_with_the_main_features():
    model, inputs = build("qwen3_vl")
    clean = feature_call(model, inputs)
    patch(model, sigma=1e-4, n_samples=2)
    tiny = feature_call(model, inputs)
    patch(model, sigma=0.5, n_samples=2)
    noisy = feature_call(model, inputs)
    assert type(noisy) is type(clean) and len(noisy.deepstack_features) == len(clean.deepstack_features) == 2
    for level_clean, level_tiny, level_noisy in zip(clean.deepstack_features, tiny.deepstack_features, noisy.deepstack_features):
        assert [t.shape for t in level_noisy] == [t.shape for t in level_clean]
        for c, t, n in zip(level_clean, level_tiny, level_noisy):
            assert cosine(c, t) > 0.999 and cosine(c, n) < 0.999  # smoothed, not passed through
    # the encoder certified and averaged is main + DeepStack levels, concatenated per image
    adapter = get_adapter(model)
    assert adapter.extract_features(clean, 2).shape == (2, 3 * clean.pooler_output[0].shape[0], 32)


def _qwen3_video(model):
    """One 4-frame 16 px clip in the Qwen2-VL patch layout: (t=2 temporal patches) x 4 x 4 rows, and its grid."""
    from fs_mllm.adapters.qwen2_vl import patchify

    frames = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return patchify(frames, 4, 2, 2), torch.tensor([[2, 4, 4]])


VIDEO_FAMILIES = [family for family in FAMILIES if ADAPTERS[family].smooths_video]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_passes_through_unsmoothed_and_smooth_video_smooths_frames(family):
    """Every family whose get_video_features sends frames through get_image_features (from the registry)."""
    model, inputs = build(family)
    frames = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # one 4-frame clip
    video, kwargs = get_adapter(model).inputs_from_images(model, frames, {})
    grid = kwargs["image_grid_thw"]
    owner = get_adapter(model).feature_owner(model)
    with torch.no_grad():
        clean = owner.get_video_features(pixel_values_videos=video, video_grid_thw=grid)
    patch(model, sigma=0.25, n_samples=N)
    calls = VisionRows(model)
    with torch.no_grad():
        passed = owner.get_video_features(pixel_values_videos=video, video_grid_thw=grid)
    assert calls.rows == [video.shape[0]]  # encoded once, unsmoothed
    torch.testing.assert_close(feature_rows(model, passed), feature_rows(model, clean))
    patch(model, sigma=0.25, n_samples=N, smooth_video=True)
    calls.rows.clear()
    with torch.no_grad():
        smoothed = owner.get_video_features(pixel_values_videos=video, video_grid_thw=grid)
    assert calls.rows == [N * video.shape[0]]
    assert feature_rows(model, smoothed).shape == feature_rows(model, clean).shape
    assert cosine(feature_rows(model, smoothed), feature_rows(model, clean)) < 0.9999
    unpatch_model(model)
    assert "get_video_features" not in owner.__dict__ and "get_image_features" not in owner.__dict__


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_generate_with_an_image_and_a_video(family):
    """End to end: the image is smoothed, the 2-frame-group video passes through (or is smoothed on request)."""
    model, inputs = build(family, batch=1)
    video, grid = _qwen3_video(model)
    ids = inputs["input_ids"][0].tolist()
    ids = torch.tensor([ids[:-4] + ([tiny_models.VISION_START] + [tiny_models.VIDEO_TOKEN] * 4) * 2 + ids[-4:]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"], pixel_values_videos=video, video_grid_thw=grid,
                 mm_token_type_ids=(ids == tiny_models.IMAGE_TOKEN).long() + 2 * (ids == tiny_models.VIDEO_TOKEN).long())
    tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
    image_rows = inputs["pixel_values"].shape[0]
    calls = VisionRows(model)
    patch(model, sigma=1e-4, n_samples=N)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), tokens)
    assert calls.rows == [N * image_rows, video.shape[0]]
    calls.rows.clear()
    patch(model, sigma=0.25, n_samples=N, smooth_video=True)
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape == tokens.shape
    assert calls.rows == [N * image_rows, N * video.shape[0]]


def test_smooth_video_setting_is_validated_and_saved():
    from fs_mllm.config import FSConfig

    with pytest.raises(ValueError, match="smooth_video must be True or False"):
        FSConfig(smooth_video="yes")
    assert FSConfig.from_dict(FSConfig(smooth_video=True).to_dict()).smooth_video is True
    old = {k: v for k, v in FSConfig().to_dict().items() if k != "smooth_video"}  # an fs_config.json from before
    assert FSConfig.from_dict(old).smooth_video is False


def test_smooth_video_refused_where_frames_never_reach_the_image_function():
    model, _ = build("llava_next_video")
    with pytest.raises(ValueError, match="smooth_video"):
        patch(model, smooth_video=True)
    assert not is_patched(model)


def test_video_llava_pixel_values_images_is_smoothed():
    """generate() passes Video-LLaVA images as pixel_values_images; they must not slip through unsmoothed."""
    model, inputs = build("video_llava")
    images = inputs.pop("pixel_values")
    tokens = model.generate(**inputs, pixel_values_images=images, max_new_tokens=3, do_sample=False)
    patch(model, sigma=0.25, n_samples=N)
    calls = VisionRows(model)
    smoothed_tokens = model.generate(**inputs, pixel_values_images=images, max_new_tokens=3, do_sample=False)
    assert calls.rows == [N * images.shape[0]] and smoothed_tokens.shape == tokens.shape


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "idefics2"])
def test_idefics_padding_sub_images_are_not_noised(family):
    """A prompt with fewer sub-images is padded with all-zero sub-images; only real ones are smoothed."""
    model, inputs = build(family)
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[1, 1] = 0  # prompt 1 has one real sub-image
    mask = inputs["pixel_attention_mask"].clone()
    mask[1, 1] = False
    clean = feature_call(model, {"pixel_values": pixel_values, "pixel_attention_mask": mask})
    patch(model, sigma=0.25, n_samples=N)
    calls = VisionRows(model)
    out = feature_call(model, {"pixel_values": pixel_values, "pixel_attention_mask": mask})
    assert calls.rows == [N * 3]
    assert [p.shape for p in out.pooler_output] == [p.shape for p in clean.pooler_output]


def test_lfm2_vl_padding_rows_are_not_noised():
    """A smaller image is padded to the batch's max_patches rows; only its real rows are smoothed."""
    model, inputs = build("lfm2_vl")
    small = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # 2 x 2 patches of 8 px
    rows, kwargs = get_adapter(model).inputs_from_images(model, small, {})
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[1] = 0
    pixel_values[1, :4] = rows[0]
    mask = inputs["pixel_attention_mask"].clone()
    mask[1, 4:] = False
    call = {"pixel_values": pixel_values, "spatial_shapes": torch.tensor([[4, 4], [2, 2]]), "pixel_attention_mask": mask}
    clean = feature_call(model, call)
    patch(model, sigma=1e-4, n_samples=2)
    shapes = []
    tiny_models.vision_module(model).register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["pixel_values"]).shape)), with_kwargs=True)
    smoothed = feature_call(model, call)
    # each image is encoded on its own real rows: the small one's 12 padding rows never reach the tower
    assert sorted(shapes) == [(2, 4, 192), (2, 16, 192)]
    assert [p.shape for p in smoothed.pooler_output] == [p.shape for p in clean.pooler_output] == [(4, 32), (1, 32)]
    for a, b in zip(smoothed.pooler_output, clean.pooler_output):
        assert cosine(a, b) > 0.999


def test_refused_family_names_the_reason():
    class Stub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": "chameleon"})()

    assert "chameleon" in REFUSED
    with pytest.raises(ValueError, match="cannot smooth model_type 'chameleon'.*discrete VQ-VAE codes"):
        patch(Stub())


def test_readme_lists_exactly_the_registered_families():
    """The families table moved from the README to the Patching docs page (issue 31)."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "patching.md").read_text()
    assert family_table() in readme
    for family in FAMILIES:
        assert f"| `{family}` |" in family_table()


# ---------------------------------------------------------------------------------------------
# full-size configs patch on the meta device (no weights materialised)
# ---------------------------------------------------------------------------------------------

MOST_USED = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3",
             "internvl", "mistral3")


@pytest.mark.parametrize("family", MOST_USED)
def test_full_size_config_patches_on_meta(family):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = CONFIG_MAPPING[family]()  # the class defaults describe the family's reference checkpoint
    with torch.device("meta"):
        model = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[family])(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    patch(model, sigma=0.25)
    assert is_patched(model)
    assert get_adapter(model).feature_dim(model) == config.get_text_config().hidden_size
    unpatch_model(model)
    assert not is_patched(model)


def _mllama_one_real_tile():
    """Tiny Mllama whose image has one real tile of two (aspect ratio [1, 1]), padded like the processor does."""
    model, inputs = build("mllama", batch=1)
    inputs["aspect_ratio_ids"] = torch.tensor([[1]])
    inputs["aspect_ratio_mask"] = torch.tensor([[[1, 0]]])
    inputs["pixel_values"][:, :, 1] = 0
    inputs["cross_attention_mask"][..., 1] = 0  # the padding tile is hidden from every token
    return model, inputs


def test_mllama_padding_tiles_are_not_part_of_the_certified_vector():
    """Padding tiles' vision states never reach the decoder (cross_attention_mask), so neither the smoothed
    features nor the certificate may depend on them."""
    import functools

    model, inputs = _mllama_one_real_tile()
    vision = model.model.vision_model
    image = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits
    scale = {"value": 1.0}
    original = vision.forward

    @functools.wraps(original)
    def scaled_padding(*args, **kwargs):  # the vision model with its padding-tile states scaled
        output = original(*args, **kwargs)
        output.last_hidden_state[:, :, 1:] *= scale["value"]
        return output

    vision.forward = scaled_padding
    scale["value"] = 50.0
    with torch.no_grad():  # the decoder does not see the padding tile's states
        torch.testing.assert_close(model(**inputs).logits, logits)
    patch(model, sigma=0.25, n_samples=N)
    scores = []
    for value in (1.0, 50.0):
        scale["value"] = value
        [certificate] = certify_model(model, image, n=8, alpha=0.1)
        scores.append(certificate.score_mean)
        states = feature_call(model, image).last_hidden_state
        assert states.shape == (1, 1, 2, 5, 64) and torch.count_nonzero(states[:, :, 1]) == 0
        assert torch.count_nonzero(states[:, :, 0]) > 0
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_false_keeps_the_original_tuple_positions(family):
    """model.get_image_features(..., return_dict=False)[i] is the same field patched and unpatched."""
    model, inputs = build(family)
    adapter = get_adapter(model)
    function = getattr(adapter.feature_owner(model), adapter.feature_function)
    names = set(inspect.signature(function).parameters)
    kwargs = {k: v for k, v in inputs.items() if k in names}
    with torch.no_grad():
        clean = function(**kwargs, return_dict=False)
        fields = list(function(**kwargs, return_dict=True).keys())
    patch(model, sigma=0.25, n_samples=2)
    function = getattr(adapter.feature_owner(model), adapter.feature_function)
    with torch.no_grad():
        smoothed = function(**kwargs, return_dict=False)
    assert isinstance(smoothed, tuple) and len(smoothed) == len(clean) == len(fields)

    def layout(value):  # container types and tensor shapes, nested
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return type(value).__name__, [layout(item) for item in value]

    for field in adapter.feature_fields:
        index = fields.index(field)
        assert layout(smoothed[index]) == layout(clean[index]), field


def test_mllama_padding_tiles_are_not_noised():
    """Real tokens attend to padding tiles in Mllama's vision model, so noised padding would leak into the real
    tiles' states: every encoder call must carry the padding tile as the processor's all-zero tile."""
    model, inputs = _mllama_one_real_tile()
    image = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    calls = []  # the tiles each encoder call embeds: (copies * tiles, 3, H, W), tile-major per copy
    tiny_models.vision_module(model).register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    patch(model, sigma=0.25, n_samples=N)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    certify_model(model, image, n=4, alpha=0.1)
    assert len(calls) >= 2
    for tiles in calls:
        tiles = tiles.reshape(-1, 2, 3, 16, 16)
        assert torch.count_nonzero(tiles[:, 1]) == 0  # the padding tile
        assert torch.count_nonzero(tiles[:, 0]) > 0
    generate_tiles = calls[0].reshape(-1, 2, 3, 16, 16)  # (certify's first call is the clean reference f(x))
    assert generate_tiles.shape[0] == N and not torch.equal(generate_tiles[0, 0], inputs["pixel_values"][0, 0, 0])


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "idefics2"])
def test_idefics_padded_pixels_of_a_real_sub_image_are_not_noised(family):
    """A sub-image padded bottom/right (pixel_attention_mask 0 there) reaches the tower with those pixels at 0:
    the patch straddling the edge is encoded whole, so noise on its padded pixels would reach the features."""
    model, inputs = build(family)
    pixel_values, mask = inputs["pixel_values"].clone(), inputs["pixel_attention_mask"].clone()
    pixel_values[0, 1, :, :, 20:] = 0  # real columns 0-19: patch column 2 (16-23) straddles the edge
    mask[0, 1, :, 20:] = False
    calls = []
    tiny_models.vision_module(model).register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0] if args else kwargs["pixel_values"]).clone()), with_kwargs=True)
    patch(model, sigma=0.25, n_samples=N)
    feature_call(model, {"pixel_values": pixel_values, "pixel_attention_mask": mask})
    encoded = torch.cat(calls)  # N copies of the 4 real sub-images (one call per mask group)
    assert encoded.shape[0] == 4 * N
    padded = [copy for copy in encoded if torch.count_nonzero(copy[:, :, 20:]) == 0]
    assert len(padded) == N and all(torch.count_nonzero(copy[:, :, :20]) > 0 for copy in padded)


class _IdsAsText:
    """A tokenizer stand-in for the tiny models (they have none): decodes token ids as their numbers."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("generate_text was given token inputs; it must not tokenise")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("patched", [False, True], ids=["base", "patched"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_text_in_one_batch_answers_and_features_as_one_image_at_a_time(family, patched):
    """generate_text batches prompts of one length: each answer, and the decoder-facing features it reads back
    from the model's own call, are those of a generate of that prompt alone (every family's batch layout)."""
    from fs_mllm.attacks import _TOKEN_KEYS, generate_text, image_features

    model, inputs = build(family)
    adapter = get_adapter(model)
    extra = {k: v for k, v in image_kwargs(model, inputs).items() if k != "pixel_values"}
    pixels = adapter.model_inputs_to_pixels(model, inputs["pixel_values"], MEAN, STD, **extra)
    rows = {k: torch.stack(v) for k, v in adapter.per_image_rows(model, inputs["pixel_values"], extra).items()}
    # per-prompt inputs that are neither tokens nor pixels (Mllama's cross-attention mask) go with the image kwargs
    rows.update({k: v for k, v in inputs.items() if k not in _TOKEN_KEYS and k != "pixel_values" and k not in rows})
    prompts = {k: v for k, v in inputs.items() if k in _TOKEN_KEYS}
    count = prompts["input_ids"].shape[0]
    assert count >= 2
    if pixels.shape[0] != count:
        pytest.skip(f"the tiny {family} packs {pixels.shape[0] // count} images per prompt; generate_text takes one per prompt")
    if patched:
        patch(model, sigma=0.25, n_samples=N)
    scale = {} if patched else {"image_mean": MEAN, "image_std": STD}
    features: list[torch.Tensor] = []
    together = generate_text(model, _IdsAsText(), pixels, prompts, 3, features=features, **scale, **rows)
    alone = [generate_text(model, _IdsAsText(), pixels[i:i + 1], {k: v[i:i + 1] for k, v in prompts.items()}, 3,
                           batch_size=1, **scale, **{k: v[i:i + 1] for k, v in rows.items()})[0] for i in range(count)]
    assert together == alone
    with torch.no_grad():
        expected = image_features(model, pixels, **scale, **{k: v for k, v in rows.items() if k in extra})
    assert len(features) == 1 and features[0].shape == expected.shape
    torch.testing.assert_close(features[0].float(), expected.float(), atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def test_generate_text_features_when_the_call_cannot_be_read_back(monkeypatch):
    """Where the model's own feature call cannot be read as one row per image (images of one batch whose
    features differ in length), generate still answers (the recorder never breaks the call it watches) and the
    features come from image_features; the recorder also keeps the patch visible (is_patched) while it watches."""
    from fs_mllm.attacks import _TOKEN_KEYS, generate_text, image_features

    model, inputs = build("llava")
    adapter = get_adapter(model)
    pixels = adapter.model_inputs_to_pixels(model, inputs["pixel_values"], MEAN, STD)
    prompts = {k: v for k, v in inputs.items() if k in _TOKEN_KEYS}
    patch(model, sigma=0.25, n_samples=N)
    seen_patched = []
    original = type(adapter).call_features

    def unreadable(self, output, count, call):
        """The decoder-facing reads (the recorder's, image_features') of a batch fail; one image, and the smoothed
        path's own reads of its noisy copies, read back."""
        caller = inspect.stack()[1].function
        if caller in ("recording", "_features"):
            seen_patched.append(is_patched(model))
            if count > 1:
                raise RuntimeError("rows of different lengths")
        return original(self, output, count, call)

    expected_answers = generate_text(model, _IdsAsText(), pixels, prompts, 3)
    monkeypatch.setattr(type(adapter), "call_features", unreadable)
    features: list[torch.Tensor] = []
    answers = generate_text(model, _IdsAsText(), pixels, prompts, 3, features=features)
    assert seen_patched[0] and answers == expected_answers  # the first call: the recorder's, inside generate
    assert len(seen_patched) == 1 + 1 + pixels.shape[0]  # then image_features on the batch, then image by image
    monkeypatch.setattr(type(adapter), "call_features", original)
    with torch.no_grad():
        expected = image_features(model, pixels)
    torch.testing.assert_close(features[0], expected)
    assert is_patched(model)  # the patch is back in place after the block
