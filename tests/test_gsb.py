"""Fast tests of the Gaussian Smoothness Booster on tiny random encoders (no real weights needed)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fs_mllm.certify import certify_features
from fs_mllm.booster.model import CONFIG_NAME, WEIGHTS_NAME, GaussianSmoothnessBooster, GSBConfig, boosted_encoder, estimate_noise_std
from fs_mllm.booster.checkpoint import flatten_optimizer_state, load_checkpoint_state, unflatten_optimizer_state
from fs_mllm.booster.data import RandomCropDataset
from fs_mllm.booster.training import GSBTrainConfig, evaluate_certificates, train_gsb

SIZE = 16
DIM = 8


class TinyEncoder(nn.Module):
    """Patchify conv + nonlinearity: (B, 3, 16, 16) -> (B, 16 tokens, DIM)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, DIM, 4, stride=4)
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x.float()).flatten(2).transpose(1, 2)
        return self.mix(torch.tanh(tokens)) + 0.5


def small_config(**changes) -> GSBConfig:
    base = dict(feature_dim=DIM, sigma_min=0.1, sigma_max=0.5, denoiser_channels=8, denoiser_depth=3,
                denoiser_downscale=2, mapper_hidden=16, mapper_layers=1, sigma_embed_dim=8, encoder_id="tiny")
    base.update(changes)
    return GSBConfig(**base)


def smooth_images(count: int = 12, seed: int = 0) -> list[np.ndarray]:
    """Smooth 'photos' (low-frequency patterns) so that denoising is learnable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.5, 3.0, size=3)
        img = np.stack([0.5 + 0.4 * np.sin(a * np.pi * xx + c), 0.5 + 0.4 * np.cos(b * np.pi * yy), 0.5 + 0.3 * np.sin(a * xx + b * yy)], -1)
        images.append(img.astype(np.float32))
    return images


def test_noise_estimate_reads_the_added_noise_and_not_the_image():
    images = torch.from_numpy(np.stack(smooth_images(6))).permute(0, 3, 1, 2)
    assert estimate_noise_std(images).max() < 0.01  # smooth content reads (almost) no noise
    g = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.25, 0.5):
        noisy = images + sigma * torch.randn(images.shape, generator=g)
        torch.testing.assert_close(estimate_noise_std(noisy), torch.full((6,), sigma), rtol=0.1, atol=0.0)
    with pytest.raises(ValueError, match="pixels01"):
        estimate_noise_std(torch.rand(3, 8, 8))


def test_estimated_level_leaves_clean_inputs_unchanged_and_matches_given_on_noisy_ones():
    images = torch.from_numpy(np.stack(smooth_images(4))).permute(0, 3, 1, 2)[..., :SIZE, :SIZE].contiguous()
    flat = torch.full((1, 3, SIZE, SIZE), 0.3)  # no detail at all: estimate exactly 0
    estimated = GaussianSmoothnessBooster(small_config())
    with torch.no_grad():
        for p in estimated.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a trained, non-identity booster
    given = GaussianSmoothnessBooster(small_config(noise_level="given"))
    given.load_state_dict(estimated.state_dict())
    encoder = TinyEncoder()
    assert torch.equal(estimated.noise_level(flat, 0.25), torch.zeros(1))
    torch.testing.assert_close(estimated(flat, encoder, 0.25), estimated.map_features(encoder(flat), 0.0))
    assert torch.equal(given.noise_level(images, 0.25), torch.full((4,), 0.25))
    # on clean inputs the denoiser is told ~0 and moves pixels far less than when told sigma
    change = lambda b: (b.denoise(images, b.noise_level(images, 0.25)) - images).abs().max()
    assert change(estimated) < 0.1 * change(given)
    noisy = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    level = estimated.noise_level(noisy, 0.3)
    assert ((level - 0.3).abs() < 0.06).all()
    torch.testing.assert_close(estimated(noisy, encoder, 0.3), given(noisy, encoder, level))
    # estimates are clamped to the trained range
    assert estimated.noise_level(torch.rand(2, 3, SIZE, SIZE) * 4, 0.3).max() <= 0.5
    with pytest.raises(ValueError, match="noise_level"):
        small_config(noise_level="guess")


def test_starts_as_identity():
    booster = GaussianSmoothnessBooster(small_config())
    x = torch.rand(2, 3, SIZE, SIZE)
    z = torch.randn(2, 5, DIM)
    assert torch.equal(booster.denoise(x, 0.25), x)
    torch.testing.assert_close(booster.map_features(z, 0.25), z)
    # and the denoiser is exactly the identity at sigma = 0 even after its weights move
    with torch.no_grad():
        for p in booster.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert torch.equal(booster.denoise(x, 0.0), x)
    assert not torch.allclose(booster.denoise(x, 0.25), x)
    assert not torch.allclose(booster.map_features(z, 0.25), z)


def test_protocol_shapes_dtypes_and_devices():
    booster = GaussianSmoothnessBooster(small_config())
    x = torch.rand(3, 3, SIZE, SIZE, dtype=torch.float64)
    assert booster.denoise(x, 0.3).shape == x.shape and booster.denoise(x, 0.3).dtype == torch.float64
    for shape in [(4, DIM), (2, 7, DIM), (2, 3, 5, DIM)]:
        z = torch.randn(shape, dtype=torch.bfloat16)
        out = booster.map_features(z, 0.3)
        assert out.shape == z.shape and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="feature_dim"):
        booster.map_features(torch.randn(2, DIM + 1), 0.3)
    with pytest.raises(ValueError, match="pixels01"):
        booster.denoise(torch.rand(3, SIZE, SIZE), 0.3)
    with pytest.raises(ValueError, match="divisible"):
        booster.denoise(torch.rand(1, 3, 15, 15), 0.3)


def test_check_compatible_refuses_clearly():
    booster = GaussianSmoothnessBooster(small_config())
    booster.check_compatible(DIM, 0.25)
    booster.check_compatible(DIM, 0.5)
    with pytest.raises(ValueError, match="feature_dim mismatch.*trained for features of size 8"):
        booster.check_compatible(DIM * 2, 0.25)
    with pytest.raises(ValueError, match=r"sigma=0.75 is outside the range \[0.1, 0.5\]"):
        booster.check_compatible(DIM, 0.75)
    with pytest.raises(ValueError, match="sigma"):
        booster.check_compatible(DIM, 0.05)
    with pytest.raises(ValueError, match="sigma"):
        booster.check_compatible(DIM, -1.0)
    encoder = TinyEncoder()
    with pytest.raises(ValueError, match="outside the range"):
        boosted_encoder(encoder, booster, 0.9)(torch.rand(1, 3, SIZE, SIZE))
    wrong = GaussianSmoothnessBooster(small_config(feature_dim=DIM + 4, use_mapper=False))
    with pytest.raises(ValueError, match="feature_dim mismatch"):
        boosted_encoder(encoder, wrong, 0.25)(torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("bad", [dict(feature_dim=0), dict(sigma_min=0.6), dict(use_denoiser=False, use_mapper=False),
                                 dict(denoiser_depth=1), dict(sigma_max=-0.1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        small_config(**bad)


def test_save_load_round_trip_exact(tmp_path):
    torch.manual_seed(1)
    booster = GaussianSmoothnessBooster(small_config(extra={"note": "x"}))
    with torch.no_grad():
        for p in booster.parameters():
            p.add_(torch.randn_like(p))
    booster.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["feature_dim"] == DIM and data["encoder_id"] == "tiny" and data["extra"] == {"note": "x"}
    loaded = GaussianSmoothnessBooster.from_pretrained(tmp_path)
    assert loaded.config == booster.config
    original, restored = booster.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(loaded.denoise(x, 0.3), booster.denoise(x, 0.3))
    with pytest.raises(ValueError, match="must contain"):
        GaussianSmoothnessBooster.from_pretrained(tmp_path / "missing")


def test_mapper_only_and_denoiser_only_parts():
    z = torch.randn(2, 4, DIM)
    x = torch.rand(2, 3, SIZE, SIZE)
    only_map = GaussianSmoothnessBooster(small_config(use_denoiser=False))
    only_den = GaussianSmoothnessBooster(small_config(use_mapper=False))
    assert only_map.denoiser is None and torch.equal(only_map.denoise(x, 0.2), x)
    assert only_den.mapper is None and torch.equal(only_den.map_features(z, 0.2), z)


def test_optimizer_state_flatten_round_trip():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)  # JSON-able, no pickle
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(restored)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    assert opt2.param_groups[0]["lr"] == 0.1


def _mean_score(encoder, images, sigma, n=64):
    return float(np.mean([c.score_mean for c in certify_features(encoder, images, sigma, n=n, seed=3)]))


def test_training_raises_score_on_tiny_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = TinyEncoder()
    images = smooth_images()
    booster = GaussianSmoothnessBooster(small_config())
    held = torch.stack([RandomCropDataset(images, SIZE, 4, seed=99, augment=False)[i] for i in range(4)])
    sigma = 0.3
    before = _mean_score(encoder, held, sigma)
    train = GSBTrainConfig(denoiser_steps=40, mapper_steps=40, batch_size=16, image_size=SIZE, denoiser_lr=3e-3,
                           mapper_lr=3e-3, checkpoint_every=1000, log_every=5, sigma_min=0.2, sigma_max=0.4)
    result = train_gsb(booster, encoder, images, train, output_dir=tmp_path, progress=False)
    assert result["step"] == 80
    history = result["history"]
    den = [h for h in history if h["stage"] == "denoiser"]
    mapper = [h for h in history if h["stage"] == "mapper"]
    assert den[-1]["loss"] < den[0]["loss"]
    assert mapper[-1]["consistency"] < mapper[0]["consistency"] + 1e-6
    after = _mean_score(boosted_encoder(encoder, booster, sigma), held, sigma)
    assert after > before, (before, after)
    rows = evaluate_certificates(boosted_encoder(encoder, booster, sigma), held, sigma, n=32, reference=encoder)
    assert all(r["clean_cos_to_reference"] > 0.8 for r in rows)
    assert (tmp_path / "final" / WEIGHTS_NAME).is_file()


def test_resume_continues_step_count(tmp_path):
    encoder = TinyEncoder()
    images = smooth_images(4)
    train = GSBTrainConfig(denoiser_steps=3, mapper_steps=3, batch_size=4, image_size=SIZE, checkpoint_every=1, log_every=1)
    torch.manual_seed(0)
    first = GaussianSmoothnessBooster(small_config())
    calls = {"n": 0}

    def dies_in_step_five(x):  # 2 encodes per step (clean target, denoised or noisy copy): no cache, features every step
        calls["n"] += 1
        if calls["n"] > 2 * 4:
            raise RuntimeError("killed")
        return encoder(x)

    train = GSBTrainConfig(**{**train.to_dict(), "mapper_cache_size": 0, "feature_every": 1})
    with pytest.raises(RuntimeError, match="killed"):
        train_gsb(first, dies_in_step_five, images, train, output_dir=tmp_path, progress=False)
    state = load_checkpoint_state(tmp_path / "checkpoint")
    assert state["step"] == 4 and state["stage"] == "mapper"
    assert any(k.endswith("exp_avg") for k in state["optimizer_tensors"])
    torch.manual_seed(123)  # a fresh booster: weights must come from the checkpoint
    second = GaussianSmoothnessBooster(small_config())
    result = train_gsb(second, encoder, images, train, output_dir=tmp_path, progress=False)
    assert result["step"] == 6
    assert [h["step"] for h in result["history"]] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint_state(tmp_path / "checkpoint")["step"] == 6
    # the denoiser trained in the first run was restored, not re-initialised
    torch.testing.assert_close(second.denoiser.state_dict()["inp.weight"], first.denoiser.state_dict()["inp.weight"])
    # other training settings cannot resume into that folder
    with pytest.raises(ValueError, match=rf"mapper_steps: stored {train.mapper_steps}, now 5"):
        train_gsb(GaussianSmoothnessBooster(small_config()), encoder, images,
                  GSBTrainConfig(**{**train.to_dict(), "mapper_steps": 5}), output_dir=tmp_path, progress=False)
    other_booster = GaussianSmoothnessBooster(small_config(mapper_hidden=8))
    with pytest.raises(ValueError, match="another GSBConfig .*mapper_hidden: stored"):
        train_gsb(other_booster, encoder, images, train, output_dir=tmp_path, progress=False)


def test_resume_after_a_kill_between_the_checkpoint_renames(tmp_path, monkeypatch):
    """Issue 14.10: killed after checkpoint -> checkpoint.old and before checkpoint.tmp -> checkpoint, the next
    run must resume from the newest complete copy (not restart at step 0 and later delete both copies)."""
    import os

    import fs_mllm.booster.checkpoint as training

    encoder = TinyEncoder()
    images = smooth_images(4)
    train = GSBTrainConfig(denoiser_steps=3, mapper_steps=3, batch_size=4, image_size=SIZE, checkpoint_every=1, log_every=1,
                           mapper_cache_size=0, feature_every=1)
    real_replace = os.replace

    def killed_before_second_rename(src, dst):
        src = Path(src)
        if src.name == "checkpoint.tmp" and json.loads((src / "trainer_state.json").read_text())["step"] == 4 \
                and (src.parent / "checkpoint.old").exists():
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", killed_before_second_rename)
    torch.manual_seed(0)
    first = GaussianSmoothnessBooster(small_config())
    with pytest.raises(KeyboardInterrupt):
        train_gsb(first, encoder, images, train, output_dir=tmp_path, progress=False)
    monkeypatch.setattr(training.os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists()
    assert (tmp_path / "checkpoint.old").is_dir() and (tmp_path / "checkpoint.tmp").is_dir()
    state = load_checkpoint_state(tmp_path / "checkpoint")
    assert state is not None and state["step"] == 4  # the newest complete copy (the .tmp one)
    torch.manual_seed(123)
    second = GaussianSmoothnessBooster(small_config())
    result = train_gsb(second, encoder, images, train, output_dir=tmp_path, progress=False)
    assert [h["step"] for h in result["history"]] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint_state(tmp_path / "checkpoint")["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


@pytest.mark.parametrize("left", ["old_only", "tmp_incomplete_and_old", "checkpoint_and_old"])
def test_checkpoint_recovery_picks_the_newest_complete_copy(tmp_path, left):
    """Every state a kill can leave behind: an incomplete .tmp is never preferred over a complete copy."""
    from fs_mllm.booster.checkpoint import save_checkpoint

    booster = GaussianSmoothnessBooster(small_config())
    optimizer = torch.optim.AdamW(booster.parameters())
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, booster, optimizer, 2, "denoiser", [])
    old = folder.with_name("checkpoint.old")
    if left == "old_only":
        folder.rename(old)
    elif left == "tmp_incomplete_and_old":
        folder.rename(old)
        tmp = folder.with_name("checkpoint.tmp")
        tmp.mkdir()
        (tmp / "trainer_state.json").write_text('{"step": 3, "sta')  # killed while writing
    else:
        shutil.copytree(folder, old)
        save_checkpoint(folder, booster, optimizer, 3, "denoiser", [])
        shutil.copytree(folder, old, dirs_exist_ok=True)
        (old / "trainer_state.json").write_text(json.dumps({**json.loads((old / "trainer_state.json").read_text()), "step": 1}))
    expected = 3 if left == "checkpoint_and_old" else 2
    assert load_checkpoint_state(folder)["step"] == expected
    save_checkpoint(folder, booster, optimizer, 9, "denoiser", [])
    assert load_checkpoint_state(folder)["step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_train_seed_fits_torch_generators():
    """Issue 14.16: a seed outside torch's generator range is a ValueError naming seed; a large valid seed
    still works although the seeds derived from it (seed * k + step) exceed the range."""
    for bad in (2**63, -1, "a", True):
        with pytest.raises(ValueError, match="seed"):
            GSBTrainConfig(seed=bad)
    dataset = RandomCropDataset(smooth_images(2), SIZE, 2, seed=2**63 - 1)
    assert dataset[1].shape == (3, SIZE, SIZE)


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        GSBTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="clean_fraction"):
        GSBTrainConfig(clean_fraction=1.0)
    with pytest.raises(ValueError, match="denoiser_steps"):
        GSBTrainConfig(denoiser_steps=-1)


def test_clean_weight_option_validated_and_logged(tmp_path):
    with pytest.raises(ValueError, match="clean_weight"):
        GSBTrainConfig(clean_weight=-1.0)
    assert GSBTrainConfig().clean_weight == 1.0  # default: plain batch mean, as before
    torch.manual_seed(0)
    encoder = TinyEncoder()
    booster = GaussianSmoothnessBooster(small_config())
    train = GSBTrainConfig(denoiser_steps=2, mapper_steps=2, batch_size=4, image_size=SIZE, clean_fraction=0.5,
                           clean_weight=4.0, checkpoint_every=1000, log_every=1, sigma_min=0.2, sigma_max=0.4)
    result = train_gsb(booster, encoder, smooth_images(4), train, progress=False)
    assert result["step"] == 4
    den = [h for h in result["history"] if h["stage"] == "denoiser"]
    mapper = [h for h in result["history"] if h["stage"] == "mapper"]
    # the noise-free half of each batch is reported separately; it is the identity target
    assert all("mse_clean" in h and "consistency_clean" in h for h in den)
    assert all("consistency_clean" in h for h in mapper)
    assert all(h["mse_clean"] >= 0 for h in den)


def test_recipe_main_accepts_argv_and_init_from(tmp_path, monkeypatch):
    import inspect

    from fs_mllm.booster import run as recipe  # the library the command calls
    from fs_mllm.commands import train_gsb as command  # recipes/train_gsb.py and `fs-mllm train-gsb` run its main

    assert list(inspect.signature(command.main).parameters) == ["argv", "prog"]
    captured = {}

    def fake_train(booster, encoder, images, train, output_dir=None, accelerator=None):
        captured["booster"], captured["train"] = booster, train
        return {"step": 0, "history": [], "seconds": 0.0, "seconds_total": 0.0}

    monkeypatch.setattr(recipe, "build_encoder", lambda name: (TinyEncoder(), "tiny"))
    monkeypatch.setattr(recipe, "train_gsb", fake_train)
    monkeypatch.setattr(recipe, "offline_photo", lambda name: smooth_images(1)[0])
    monkeypatch.setattr(recipe, "heldout_images", lambda size: torch.rand(2, 3, size, size))
    init = GaussianSmoothnessBooster(GSBConfig(feature_dim=DIM, sigma_min=0.2, sigma_max=0.55, denoiser_channels=8,
                                               denoiser_depth=3, mapper_hidden=16))
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.1)
    init.save_pretrained(tmp_path / "init")
    common = ["--size", str(SIZE), "--output-dir", str(tmp_path / "run"), "--eval-n", "0", "--denoiser-channels", "8",
              "--denoiser-depth", "3", "--mapper-hidden", "16", "--clean-fraction", "0.5", "--clean-weight", "3"]
    command.main(common + ["--init-from", str(tmp_path / "init")])
    assert captured["train"].clean_fraction == 0.5 and captured["train"].clean_weight == 3.0
    loaded = captured["booster"].state_dict()
    for key, value in init.state_dict().items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(ValueError, match="init_from"):
        command.main(common[:-6] + ["--denoiser-depth", "4", "--mapper-hidden", "16", "--init-from", str(tmp_path / "init")])


def test_shipped_mini_llava_booster_is_a_fine_tuned_denoiser_that_leaves_clean_photos_alone():
    """The shipped fs-mini-llava booster: the DINOv2 booster's denoiser architecture, fine-tuned (its config
    records each run's command), no mapper, declared for the decoder-facing 576-d features; on clean held-out
    photos (told the level measured on them, ~0) it changes the pixels by well under 1% in squared norm."""
    from pathlib import Path

    import fs_mllm
    from fs_mllm.booster.data import heldout_images

    weights = Path(fs_mllm.__file__).parent / "weights"
    source = GaussianSmoothnessBooster.from_pretrained(weights / "gsb_dinov2_s025")
    derived = GaussianSmoothnessBooster.from_pretrained(weights / "gsb_mini_llava_s025").eval()
    assert derived.mapper is None and derived.config.feature_dim == 576
    assert [(k, v.shape) for k, v in source.denoiser.state_dict().items()] == \
        [(k, v.shape) for k, v in derived.denoiser.state_dict().items()]
    runs = derived.config.extra["finetune_runs"]
    assert runs[1]["recipe"].split()[:3] == ["OMP_NUM_THREADS=1", "fs-mllm", "train-mapper"]
    assert all(run["seconds"] if "seconds" in run else run["seconds_training"] for run in runs)
    derived.check_compatible(576, 0.25)
    with pytest.raises(ValueError, match="feature_dim mismatch"):
        derived.check_compatible(384, 0.25)
    photos = heldout_images(112)
    with torch.no_grad():
        cleaned = derived.denoise(photos, derived.noise_level(photos, 0.25))
    change = (cleaned - photos).pow(2).flatten(1).sum(1) / photos.pow(2).flatten(1).sum(1)
    assert change.max() < 1e-3, change
    noisy = (photos + 0.25 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        denoised = derived.denoise(noisy, derived.noise_level(noisy, 0.25))
    assert (denoised - photos).pow(2).mean() < 0.5 * (noisy - photos).pow(2).mean()  # it does denoise (0.40x measured)


# ---------------------------------------------------------------------------------------------
# utility training of an MLLM booster's mapper (fs_mllm.booster.through_lm)
# ---------------------------------------------------------------------------------------------

class _WordTokenizer:
    """Maps characters to ids below the tiny LLaVA's image token, so prompts and answers tokenise."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 + (ord(c) % 90) for c in text]}


def test_utility_training_trains_only_the_mapper_through_the_deployed_smoothing(tmp_path):
    from fs_mllm.booster.through_lm import UtilityTrainConfig, feature_bank, smoothed_bank_features, train_mapper_utility, with_mapper
    from fs_mllm.patching import patch_model, unpatch_model
    from fs_mllm.attacks import image_features

    from fs_mllm.testing import IMAGE_TOKEN, build_llava

    model, _ = build_llava()
    mean, std = [0.5] * 3, [0.25] * 3
    denoiser_only = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_mapper=False, denoiser_channels=8,
                                                        denoiser_depth=2, sigma_min=0.1, sigma_max=0.5))
    booster = with_mapper(denoiser_only, 32, "tiny-llava")
    assert torch.equal(booster.denoiser.state_dict()["out.weight"], denoiser_only.denoiser.state_dict()["out.weight"])
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.config.image_mean, model.config.image_std = mean, std
    processor = type("P", (), {"image_mean": mean, "image_std": std})()
    bank = feature_bank(model, processor, booster, images, n_copies=4, sigma=0.25, progress=False)
    assert bank["noisy"].shape[:2] == (3, 4) and bank["clean"].shape[0] == 3

    # the banked smoothing is the deployed one: same features as the patched model on the same noise
    with torch.no_grad():
        smoothed = smoothed_bank_features(booster, bank["noisy"][:1], bank["levels"][:1])
    patch_model(model, sigma=0.25, n_samples=64, booster=booster, image_mean=mean, image_std=std)
    with torch.no_grad():
        deployed = image_features(model, images[:1])
    unpatch_model(model)
    assert torch.nn.functional.cosine_similarity(smoothed.flatten(1), deployed.flatten(1)).item() > 0.9

    before = {k: v.clone() for k, v in booster.state_dict().items()}
    frozen = [p.clone() for p in model.parameters()]
    qa = [[("what?", ["red"])]] * 3
    train = UtilityTrainConfig(steps=3, batch_size=2, images=3, n_copies=4, checkpoint_every=2)
    result = train_mapper_utility(model, _WordTokenizer(), booster, bank, qa, lambda q: "<image> " + q, IMAGE_TOKEN,
                                  train, output_dir=str(tmp_path), progress=False)
    assert result["steps"] == 3 and all(math.isfinite(h["loss"]) for h in result["history"])
    after = booster.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mapper."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("denoiser."))
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))  # the MLLM stays frozen
    # resuming a finished run changes nothing; other settings are refused
    again = train_mapper_utility(model, _WordTokenizer(), booster, bank, qa, lambda q: "<image> " + q, IMAGE_TOKEN,
                                 train, output_dir=str(tmp_path), progress=False)
    assert again["steps"] == 3
    with pytest.raises(ValueError, match=r"other settings \(.*steps: stored 3, now 4\)"):
        train_mapper_utility(model, _WordTokenizer(), booster, bank, qa, lambda q: "<image> " + q, IMAGE_TOKEN,
                             UtilityTrainConfig(steps=4, batch_size=2, images=3, n_copies=4), output_dir=str(tmp_path),
                             progress=False)


def test_utility_training_of_the_denoiser_runs_through_the_patched_smoothed_path(tmp_path):
    """Stage "denoiser": only the denoiser learns, through the frozen tower, projector and language model on
    the deployed smoothed path; the model comes back unpatched; a finished run resumes to itself."""
    from fs_mllm.booster.through_lm import UtilityTrainConfig, train_path_utility
    from fs_mllm.patching import is_patched, patch_model, unpatch_model
    from fs_mllm.testing import IMAGE_TOKEN, build_llava

    model, _ = build_llava()
    mean, std = [0.5] * 3, [0.25] * 3
    booster = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_mapper=False, denoiser_channels=8,
                                                  denoiser_depth=2, sigma_min=0.1, sigma_max=0.5))
    processor = type("P", (), {"image_mean": mean, "image_std": std, "tokenizer": _WordTokenizer()})()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qa = [[("what?", ["red"])]] * 3
    before = {k: v.clone() for k, v in booster.state_dict().items()}
    frozen = [p.clone() for p in model.parameters()]
    train = UtilityTrainConfig(stage="denoiser", steps=3, batch_size=2, images=3, n_copies=2, checkpoint_every=2)
    run = lambda config: train_path_utility(model, processor, booster, images, qa, lambda q: "<image> " + q,  # noqa: E731
                                            IMAGE_TOKEN, config, output_dir=str(tmp_path), progress=False)
    result = run(train)
    assert result["steps"] == 3 and all(math.isfinite(h["loss"]) for h in result["history"])
    assert any(not torch.equal(before[k], v) for k, v in booster.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    assert not is_patched(model)
    assert run(train)["steps"] == 3
    with pytest.raises(ValueError, match=r"other settings \(.*steps: stored 3, now 4\)"):
        run(UtilityTrainConfig(stage="denoiser", steps=4, batch_size=2, images=3, n_copies=2))
    patch_model(model, sigma=0.25, image_mean=mean, image_std=std)
    with pytest.raises(ValueError, match="unpatched"):
        run(train)
    with pytest.raises(ValueError, match="stage"):
        UtilityTrainConfig(stage="projector")
    unpatch_model(model)
    told = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_mapper=False, denoiser_channels=8, denoiser_depth=2,
                                               sigma_min=0.1, sigma_max=0.5, noise_level="given"))
    with pytest.raises(ValueError, match="estimated"):
        train_path_utility(model, processor, told, images, qa, lambda q: "<image> " + q, IMAGE_TOKEN, train,
                           output_dir=str(tmp_path / "given"), progress=False)
    with pytest.raises(ValueError, match="sigma"):
        train_path_utility(model, processor, booster, images, qa, lambda q: "<image> " + q, IMAGE_TOKEN,
                           UtilityTrainConfig(stage="denoiser", sigma=0.9, steps=1, batch_size=2, images=3, n_copies=2),
                           output_dir=str(tmp_path / "far"), progress=False)


def test_joint_utility_training_trains_denoiser_and_mapper_on_the_smoothed_path(tmp_path):
    """Stage "joint" (booster v2): the denoiser and the mapper learn together on the deployed smoothed path, fresh
    noise every step, with the statistics term when stats_weight > 0; everything else stays frozen; a booster
    without a mapper, or the bank-trained mapper stage, is refused by this path."""
    from fs_mllm.booster.through_lm import UtilityTrainConfig, train_path_utility
    from fs_mllm.patching import is_patched
    from fs_mllm.testing import IMAGE_TOKEN, build_llava

    model, _ = build_llava()
    processor = type("P", (), {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "tokenizer": _WordTokenizer()})()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    qa = [[("what?", ["red"])]] * 3
    torch.manual_seed(0)
    booster = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, denoiser_channels=8, denoiser_depth=2, mapper_hidden=16,
                                                  sigma_min=0.1, sigma_max=0.5))
    denoiser_before = {k: v.clone() for k, v in booster.denoiser.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in booster.mapper.state_dict().items()}
    frozen = [p.clone() for p in model.parameters()]
    train = UtilityTrainConfig(stage="joint", steps=2, batch_size=2, images=3, n_copies=2, stats_weight=0.5)
    run = lambda booster, config, folder: train_path_utility(  # noqa: E731
        model, processor, booster, images, qa, lambda q: "<image> " + q, IMAGE_TOKEN, config, output_dir=str(tmp_path / folder),
        progress=False)
    result = run(booster, train, "joint")
    assert result["steps"] == 2 and all(math.isfinite(h["stats"]) and h["stats"] >= 0 for h in result["history"])
    assert any(not torch.equal(denoiser_before[k], v) for k, v in booster.denoiser.state_dict().items())
    assert any(not torch.equal(mapper_before[k], v) for k, v in booster.mapper.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters())) and not is_patched(model)
    no_mapper = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_mapper=False, denoiser_channels=8, denoiser_depth=2,
                                                    sigma_min=0.1, sigma_max=0.5))
    with pytest.raises(ValueError, match="no mapper"):
        run(no_mapper, train, "none")
    with pytest.raises(ValueError, match="feature bank"):
        run(booster, UtilityTrainConfig(stage="mapper", steps=1), "bank")
    plain = UtilityTrainConfig(stage="denoiser", steps=1, batch_size=2, images=3, n_copies=2)
    assert "stats" not in run(no_mapper, plain, "plain")["history"][0]  # off at its default: the old stages' loss


def test_utility_training_resumes_from_the_copy_a_kill_left_behind(tmp_path):
    """A kill after the new checkpoint copy (checkpoint.tmp, step 4) was written but before the rename: the
    resume takes step 4's weights with step 4's optimizer state, not the older folder's weights."""
    import json
    import shutil

    from fs_mllm.booster.through_lm import UtilityTrainConfig, train_path_utility
    from fs_mllm.testing import IMAGE_TOKEN, build_llava

    model, _ = build_llava()
    mean, std = [0.5] * 3, [0.25] * 3
    processor = type("P", (), {"image_mean": mean, "image_std": std, "tokenizer": _WordTokenizer()})()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qa = [[("what?", ["red"])]] * 2
    make = lambda: GaussianSmoothnessBooster(GSBConfig(feature_dim=32, use_mapper=False, denoiser_channels=8,  # noqa: E731
                                                       denoiser_depth=2, sigma_min=0.1, sigma_max=0.5))
    train = UtilityTrainConfig(stage="denoiser", steps=4, batch_size=2, images=2, n_copies=2, checkpoint_every=2)
    finished = make()
    train_path_utility(model, processor, finished, images, qa, lambda q: "<image> " + q, IMAGE_TOKEN, train,
                       output_dir=str(tmp_path / "a"), progress=False)
    killed = tmp_path / "b" / "checkpoint"
    shutil.copytree(tmp_path / "a" / "checkpoint", killed.with_name("checkpoint.tmp"))  # complete, step 4
    shutil.copytree(tmp_path / "a" / "checkpoint", killed)  # the older copy: step 2, other weights
    make().save_pretrained(killed)
    state = json.loads((killed / "trainer_state.json").read_text())
    (killed / "trainer_state.json").write_text(json.dumps({**state, "step": 2, "history": state["history"][:2]}))
    resumed = make()
    result = train_path_utility(model, processor, resumed, images, qa, lambda q: "<image> " + q, IMAGE_TOKEN, train,
                                output_dir=str(tmp_path / "b"), progress=False)
    assert result["steps"] == 4
    for key, value in finished.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_recipe_writes_the_shipped_boosters_training_images_from_the_utility_training_scenes(tmp_path, monkeypatch, capsys):
    """The recipe's image folder (train-gsb's input) holds the very scenes the utility stage trains on:
    the synthetic *training* split, one seed in one place (fs_mllm.booster.through_lm.training_scenes). The recipe
    runs as `python recipes/make_mini_llava_booster.py ...` does (its file as __main__, that argv), in-process:
    an exception is what a non-zero exit status would be."""
    import runpy

    import numpy as np
    from PIL import Image

    from fs_mllm.booster.data import TRAIN_PHOTOS
    from fs_mllm.booster.through_lm import training_scenes
    from fs_mllm.synthetic import make_dataset

    script = Path(__file__).resolve().parent.parent / "recipes" / "make_mini_llava_booster.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--write-train-images", str(tmp_path / "imgs"), "--synthetic", "2"])
    runpy.run_path(str(script), run_name="__main__")
    assert "wrote 2 synthetic scenes" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == sorted(["synth_0000.png", "synth_0001.png"] + [f"photo_{n}.png" for n in TRAIN_PHOTOS])
    scenes = training_scenes(2)
    assert all(s.meta["split"] == "train" for s in scenes)
    heldout = make_dataset(2, split="heldout", size=scenes[0].image.size[0])
    for i, scene in enumerate(scenes):
        written = np.asarray(Image.open(tmp_path / "imgs" / f"synth_{i:04d}.png"))
        assert np.array_equal(written, np.asarray(scene.image))
        assert not np.array_equal(written, np.asarray(heldout[i].image))


def test_the_training_command_is_a_booster_training_run_with_its_defaults(tmp_path):
    """fs-mllm train-gsb with no options is BoosterTrainingRun's defaults (one place for them)."""
    from fs_mllm.commands.train_gsb import build_parser, run_from_args
    from fs_mllm.booster.run import BoosterTrainingRun

    run = run_from_args(build_parser().parse_args(["--output-dir", str(tmp_path / "run")]))
    assert run == BoosterTrainingRun(output_dir=str(tmp_path / "run"))
    flags = run_from_args(build_parser().parse_args(["--output-dir", "o", "--no-mapper", "--mapper-steps", "7"]))
    assert (flags.use_mapper, flags.use_denoiser, flags.mapper_steps) == (False, True, 7)
    assert flags.train_config().mapper_steps == 7 and flags.train_config().image_size == flags.size


@pytest.mark.parametrize("fields, needle", [
    ({"sigma_min": 0.6, "sigma_max": 0.5}, "sigma_min (0.6) must be <= sigma_max (0.5)"),
    ({"eval_n": 1}, "eval_n must be 0 (no evaluation) or an integer >= 2"),
    ({"images": "/no/such/folder"}, "images: '/no/such/folder' is not a folder"),
    ({"init_from": "/no/such/booster"}, "init_from: '/no/such/booster' is not a folder"),
    ({"dataset": "d", "images": "."}, "images and dataset are two sources"),
    ({"heldout_fraction": 1.0}, "heldout_fraction must be a number in (0, 1)"),
    ({"noise_level": "guessed"}, "noise_level must be one of"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"eval_sigmas": (0.25, 0.0)}, "each of eval_sigmas"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"seed": -1}, "seed must be"),
])
def test_booster_training_run_refuses_bad_settings(fields, needle):
    from fs_mllm.booster.run import BoosterTrainingRun

    with pytest.raises(ValueError, match=re.escape(needle)):
        BoosterTrainingRun(output_dir="o", **fields)


def test_the_training_command_names_options_where_the_library_names_fields(capsys):
    from fs_mllm.commands.train_gsb import main

    with pytest.raises(SystemExit) as exc:
        main(["--output-dir", "o", "--sigma-min", "0.6", "--sigma-max", "0.5"])
    assert exc.value.code == 2 and "--sigma-min (0.6) must be <= --sigma-max (0.5)" in capsys.readouterr().err


def test_the_train_mapper_command_is_one_library_call(tmp_path, monkeypatch, capsys):
    """fs-mllm train-mapper parses into a UtilityTrainConfig and calls train_utility_booster once, recording
    the command line it ran (the training itself is tested above, through tiny models)."""
    import fs_mllm.commands.train_mapper as command
    from fs_mllm.booster.through_lm import UtilityTrainConfig

    calls = []
    monkeypatch.setattr(command, "train_utility_booster", lambda train, out, **kw: calls.append((train, out, kw)) or {"saved": "x"})
    argv = ["--stage", "denoiser", "--steps", "3", "--output-dir", str(tmp_path / "o"), "--save-to", str(tmp_path / "b")]
    assert command.main(argv, prog="fs-mllm train-mapper") == 0
    ((train, out, kw),) = calls
    assert train == UtilityTrainConfig(stage="denoiser", steps=3) and out == str(tmp_path / "o")
    assert kw["save_to"] == str(tmp_path / "b") and kw["recipe"].split()[:4] == ["fs-mllm", "train-mapper", "--stage", "denoiser"]
    assert json.loads(capsys.readouterr().out) == {"saved": "x"}
    with pytest.raises(SystemExit) as exc:
        command.main(["--stage", "projector", "--output-dir", "o"])
    assert exc.value.code == 2 and not calls[1:]


def test_a_training_run_checks_the_boosters_shape_before_any_encoder_loads():
    from fs_mllm.booster.run import BoosterTrainingRun

    with pytest.raises(ValueError, match="use_denoiser and use_mapper are both False"):
        BoosterTrainingRun(output_dir="o", use_denoiser=False, use_mapper=False)
    with pytest.raises(ValueError, match="denoiser_depth must be an integer >= 2"):
        BoosterTrainingRun(output_dir="o", denoiser_depth=1)
    config = BoosterTrainingRun(output_dir="o").booster_config(384, "enc", {"k": 1})
    assert (config.feature_dim, config.encoder_id, config.extra, config.denoiser_channels, config.image_size) == (384, "enc", {"k": 1}, 48, 112)


def test_utility_training_settings_are_checked_naming_the_field():
    from fs_mllm.booster.through_lm import UtilityTrainConfig

    for field, value in (("stats_weight", -1.0), ("stats_weight", float("nan")), ("identity_weight", -3), ("lr", 0),
                         ("steps", 0), ("n_copies", 1.5), ("sigma", 0), ("seed", -1)):
        with pytest.raises(ValueError, match=field):
            UtilityTrainConfig(**{field: value})
