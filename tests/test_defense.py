"""Attack protocols (transfer vs adaptive), targeted feature matching, the defense table's metrics, the demo.

Tiny random-weight LLaVA from its config (fs_mllm/testing.py); the demo runs the installed
``fs-mllm`` console script on the embedded offline model, as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fs_mllm.defense

from fs_mllm.attacks import AttackConfig, attack, eot_gradient, image_features, make_objective
from fs_mllm.config import FSConfig
from fs_mllm.defense import DefenseSettings, EvalItem, answer_metrics, apply_variant, defense_table, evaluate_defense
from fs_mllm.patching import get_fs_state, is_patched, patch_model

from test_attacks import MEAN, STD, cos, images, tiny_processor
from fs_mllm.testing import build_llava


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def model():
    m, _ = build_llava()
    return m


def transfer_config(**overrides) -> AttackConfig:
    return AttackConfig(**{"norm": "linf", "eps": 16 / 255, "steps": 6, "objective": "feature_target",
                           "protocol": "transfer", "seed": 1, **overrides})


# ---------------------------------------------------------------------------------------------
# transfer protocol
# ---------------------------------------------------------------------------------------------

def test_transfer_images_are_crafted_without_the_defense_and_the_patch_comes_back(model):
    x, target = images(2, seed=0), images(2, seed=5)
    crafted_on_base = attack(model, None, x, None, transfer_config(), target_images=target, image_mean=MEAN, image_std=STD)
    patch_model(model, sigma=0.25, n_samples=4, seed=3, image_mean=MEAN, image_std=STD)
    config_before = get_fs_state(model).config
    crafted_on_patched = attack(model, None, x, None, transfer_config(), target_images=target)
    # crafted once, on the undefended path: the defended model's noise never entered the images
    assert torch.equal(crafted_on_base.adv_images, crafted_on_patched.adv_images)
    assert is_patched(model) and get_fs_state(model).config == config_before
    # FCS is measured on the model as given: the smoothed features of clean vs replayed images
    with torch.no_grad():
        expected = cos(image_features(model, crafted_on_patched.adv_images), image_features(model, x))
    assert torch.allclose(torch.tensor(crafted_on_patched.fcs), expected, atol=1e-5)
    assert crafted_on_base.fcs != crafted_on_patched.fcs


def test_feature_target_pulls_features_towards_the_target(model):
    x, target = images(2, seed=0), images(2, seed=5)
    with torch.no_grad():
        before = cos(image_features(model, x, MEAN, STD), image_features(model, target, MEAN, STD))
    result = attack(model, None, x, None, transfer_config(steps=10), target_images=target, image_mean=MEAN, image_std=STD)
    with torch.no_grad():
        after = cos(image_features(model, result.adv_images, MEAN, STD), image_features(model, target, MEAN, STD))
    assert (after > before + 0.05).all(), (before, after)
    assert max(result.delta_norm) <= 16 / 255 + 1e-6


def test_one_target_image_serves_the_whole_batch(model):
    x, target = images(2, seed=0), images(1, seed=5)
    result = attack(model, None, x, None, transfer_config(steps=2), target_images=target, image_mean=MEAN, image_std=STD)
    assert result.adv_images.shape == x.shape


def test_surrogate_ensemble_averages_the_objectives(model):
    x, target = images(2, seed=0), images(2, seed=5)
    vision = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    config = transfer_config(steps=1)
    own, _ = make_objective(model, None, x, None, config, image_mean=MEAN, image_std=STD, target_images=target)
    single, _ = make_objective(model, None, x, None, config, image_mean=MEAN, image_std=STD, target_images=target,
                               surrogates=[vision])
    ensemble, _ = make_objective(model, None, x, None, config, image_mean=MEAN, image_std=STD, target_images=target,
                                 surrogates=["model", vision])
    with torch.no_grad():
        assert torch.allclose(ensemble(x), (own(x) + single(x)) / 2, atol=1e-6)


def test_local_crops_change_the_gradient_and_stay_in_the_ball(model):
    x, target = images(2, seed=0), images(2, seed=5)
    plain = attack(model, None, x, None, transfer_config(steps=3), target_images=target, image_mean=MEAN, image_std=STD)
    cropped = attack(model, None, x, None, transfer_config(steps=3, crop_scale=(0.5, 0.9)), target_images=target,
                     image_mean=MEAN, image_std=STD)
    assert not torch.equal(plain.adv_images, cropped.adv_images)
    assert max(cropped.delta_norm) <= 16 / 255 + 1e-6


def test_the_per_step_seeds_are_those_of_earlier_versions():
    """One crop (and EOT's noise seeds) per forward come from the same stream as before crop_views existed, so
    transfer images and adaptive attacks crafted by earlier versions are reproduced (pinned values)."""
    from fs_mllm.attacks import _step_seeds

    config = transfer_config(seed=0)
    assert _step_seeds(config, 3, 1) == [2613022947]
    assert _step_seeds(config, 3, 8)[:2] == [2613022947, 1532590702]


def test_crop_views_average_the_gradients_of_their_crops(model):
    """crop_views=k on the undefended model: the gradient is the mean of k single-crop gradients, each
    crop drawn from its own seed of the step, so k = 1 is M-Attack's one crop and more follow the
    expectation over crops."""
    from fs_mllm.attacks import _local_crops, _step_seeds

    x, target = images(2, seed=0), images(2, seed=5)
    config = transfer_config(steps=1, crop_scale=(0.5, 0.9), crop_views=3)
    objective, _ = make_objective(model, None, x, None, config, image_mean=MEAN, image_std=STD, target_images=target)

    def expected(full_view: bool) -> tuple[torch.Tensor, torch.Tensor]:
        grad, loss = torch.zeros_like(x), torch.zeros(2)
        for index, seed in enumerate(_step_seeds(config, 4, 3)):
            leaf = x.clone().requires_grad_(True)
            view = leaf if full_view and index == 0 else _local_crops(leaf, config.crop_scale, torch.Generator().manual_seed(seed))
            one = objective(view)
            (g,) = torch.autograd.grad(one.sum(), leaf)
            grad, loss = grad + g / 3, loss + one.detach() / 3
        return loss, grad

    for full_view in (False, True):
        loss, grad = eot_gradient(model, objective, x, dataclasses.replace(config, crop_full_view=full_view), step=4)
        want_loss, want_grad = expected(full_view)
        assert torch.allclose(grad, want_grad, atol=1e-6) and torch.allclose(loss, want_loss, atol=1e-6)
    for chunk in (1, 2):  # backward every `chunk` forwards: the first forward of the gradient is still the whole one
        chunked = dataclasses.replace(config, crop_full_view=True, eot_chunk_size=chunk)
        assert torch.allclose(eot_gradient(model, objective, x, chunked, step=4)[1], expected(True)[1], atol=1e-6)
    crops_only, _ = eot_gradient(model, objective, x, config, step=4)
    with_full, _ = eot_gradient(model, objective, x, dataclasses.replace(config, crop_full_view=True), step=4)
    one_view, _ = eot_gradient(model, objective, x, dataclasses.replace(config, crop_views=1), step=4)
    assert not torch.allclose(one_view, crops_only) and not torch.allclose(with_full, crops_only)


# ---------------------------------------------------------------------------------------------
# adaptive protocol: the gradient goes through the booster
# ---------------------------------------------------------------------------------------------

class ConstantDenoiser:
    """A booster whose denoiser ignores its input: the boosted smoothed features cannot depend on the image."""

    def check_compatible(self, feature_dim: int, sigma: float) -> None:
        pass

    def denoise(self, pixels01: torch.Tensor, sigma: float) -> torch.Tensor:
        return pixels01 * 0 + 0.5


def test_adaptive_gradient_flows_through_the_booster(model):
    x = images(2, seed=0)
    config = AttackConfig(eps=0.5, steps=1, eot_samples=2, seed=0)
    patch_model(model, sigma=0.25, n_samples=2, image_mean=MEAN, image_std=STD)
    objective, _ = make_objective(model, None, x, None, config)
    _, without_booster = eot_gradient(model, objective, x, config)
    assert without_booster.abs().sum() > 0
    patch_model(model, sigma=0.25, n_samples=2, image_mean=MEAN, image_std=STD, booster=ConstantDenoiser())
    objective, _ = make_objective(model, None, x, None, config)
    _, with_booster = eot_gradient(model, objective, x, config)
    # were the booster bypassed, this gradient would equal the one above; through it, it is exactly zero
    assert with_booster.abs().sum() == 0


def test_adaptive_defaults_are_strong_enough_to_believe():
    config = AttackConfig()
    assert config.protocol == "adaptive" and config.steps >= 20 and config.eot_samples >= 8


# ---------------------------------------------------------------------------------------------
# errors name the parameter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(protocol="replay"), "protocol"),
    (dict(norm="linf", eps=16), "eps"),  # 16 instead of 16/255
    (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
    (dict(crop_scale=(0.9, 0.5)), "crop_scale"),
    (dict(crop_scale="big"), "crop_scale"),
    (dict(protocol="transfer", crop_views=2), "crop_scale"),  # views of what: no crops
    (dict(protocol="transfer", crop_scale=(0.5, 1.0), crop_views=0), "crop_views"),
    (dict(protocol="transfer", crop_full_view=True, crop_views=2), "crop_scale"),
    (dict(protocol="transfer", crop_scale=(0.5, 1.0), crop_full_view="yes"), "crop_full_view"),
    (dict(protocol="transfer", crop_scale=(0.5, 1.0), crop_full_view=True), "crop_views >= 2"),  # the only view is whole
    (dict(crop_scale=(0.5, 1.0), crop_views=2), "protocol='transfer'"),  # adaptive: its forwards are the EOT samples
    (dict(crop_scale=(0.5, 1.0), crop_full_view=True, crop_views=2), "protocol='transfer'"),
])
def test_protocol_config_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AttackConfig(**kwargs)


def test_attack_errors_name_the_parameter(model):
    x = images(2)
    with pytest.raises(ValueError, match="target_images"):
        attack(model, None, x, None, transfer_config(), image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="target_images"):
        attack(model, None, x, None, transfer_config(), target_images=torch.rand(2, 3, 16, 16), image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="target_images"):
        attack(model, None, x, None, AttackConfig(steps=1), target_images=x, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="eps"):
        attack(model, None, x, None, AttackConfig(eps=1000.0, steps=1), image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="surrogates"):
        attack(model, None, x, None, AttackConfig(steps=1), surrogates=["model"], image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="surrogates"):
        attack(model, None, x, None, transfer_config(), target_images=x, surrogates=["resnet"], image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="variant"):
        apply_variant(model, "fs+tta", FSConfig())
    with pytest.raises(ValueError, match="booster"):
        apply_variant(model, "fs+gsb", FSConfig())
    with pytest.raises(ValueError, match="transfer_linf: eps=16"):
        DefenseSettings(transfer_linf=(16,))
    with pytest.raises(ValueError, match="ensemble_weighting='gradient' weighs the members of surrogates"):
        DefenseSettings(ensemble_weighting="gradient")  # the model's own path is one encoder
    with pytest.raises(ValueError, match="ensemble_weighting must be one of"):
        DefenseSettings(surrogates=("dinov2", "dinov2-cls112"), ensemble_weighting="max")
    weighted = DefenseSettings(surrogates=("dinov2", "dinov2-cls112"), ensemble_weighting="gradient")
    assert weighted._transfer_config(16 / 255).ensemble_weighting == "gradient"
    # variants: one check shared with EvalSettings (a comma string is accepted; empty, unknown, repeated refused)
    assert DefenseSettings(variants="base, fs+gsb").variants == ("base", "fs+gsb")
    unknown = r"subset of \['base', 'fs', 'fs\+gsb'\], got 'base,fs\+tta' \(unknown: 'fs\+tta'\)"
    for bad, message in (("", "at least one"), ("base,fs+tta", unknown), (("fs", "fs"), "repeat"), (5, "subset of")):
        with pytest.raises(ValueError, match=message):
            DefenseSettings(variants=bad)


# ---------------------------------------------------------------------------------------------
# the defense table
# ---------------------------------------------------------------------------------------------

def test_answer_metrics_count_right_to_wrong_and_the_target_answer():
    answers = [["red"], ["two"], ["cat"], ["left"]]
    clean = ["red", "two", "dog", "left"]          # 3 right
    adv = ["blue", "two", "cat", "right"]          # right->wrong: red, left
    target = ["blue", "three", "cat", "left"]      # target == clean on the last: not counted
    metrics = answer_metrics(clean, adv, answers, target)
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    assert metrics["attack_success"] == pytest.approx(2 / 3)
    assert metrics["targeted_success"] == pytest.approx(2 / 3)  # blue hit, three missed, cat hit (dog -> cat)
    assert answer_metrics(clean, adv, answers)["targeted_success"] is None
    assert (metrics["right_before"], metrics["right_after"]) == (3, 2)  # the counts behind 2/3 and 2/4


def test_the_certified_cell_never_averages_the_no_guarantee_placeholders():
    from fs_mllm.defense import certified_cell, certified_summary

    summary = certified_summary([0.8, 0.6, -1.0, -1.0], 0.0625)
    assert summary["certified_fcsb"] == pytest.approx(-0.15)  # the stored mean: -1 is the trivial cosine bound
    assert summary["certified_share"] == 0.5 and summary["certified_fcsb_guaranteed"] == pytest.approx(0.7)
    row = {"certified_fcsb": -0.15, **summary}
    assert certified_cell(row) == "0.700 on 2/4 (l2 0.0625)"
    assert certified_cell(certified_summary([-1.0, -1.0], 1.0)) == "none of 2 (l2 1)"
    assert certified_cell({"certified_fcsb": None}) == "-"


def test_evaluate_defense_rows_on_a_tiny_model(model):
    processor = tiny_processor()
    x, target = images(2, seed=0), images(2, seed=5)
    items = [EvalItem(x[i], "what?", ["a"], target[i], "<image> what?") for i in range(2)]
    settings = DefenseSettings(variants=("base", "fs"), fs=FSConfig(n_samples=2), transfer_linf=(8 / 255,), transfer_steps=2,
                               crop_scale=None, adaptive_l2=(0.0625,), adaptive_linf=(), adaptive_steps=1,
                               eot_samples=2, certify_images=1, certify_n=20, max_new_tokens=2)
    rows = evaluate_defense(model, processor, items, items, settings, progress=False)
    assert [(r["variant"], r["protocol"]) for r in rows] == [
        (v, p) for v in ("base", "fs") for p in ("clean", "noise", "transfer", "adaptive")]
    assert not is_patched(model)
    for row in rows:
        assert 0 <= row["accuracy"] <= 1
        if row["variant"] == "base":
            assert row["certified_fcsb"] is None
        else:
            assert -1 <= row["certified_fcsb"] <= 1 and row["certified_images"] == 1
            assert row["certified_share"] in (0.0, 1.0)
        right_before, right_after = row["right_before"], row["right_after"]
        assert right_after == round(row["accuracy"] * row["n"])
        assert (right_before is None) == (row["protocol"] == "clean")
    noise_fs, transfer_fs = rows[5], rows[6]
    assert transfer_fs["certified_radius_l2"] == pytest.approx(8 / 255 * (3 * 32 * 32) ** 0.5)
    assert noise_fs["eps"] == transfer_fs["eps"] and noise_fs["certified_radius_l2"] == transfer_fs["certified_radius_l2"]
    assert noise_fs["targeted_success"] is None  # the control has no target
    assert "linf 8/255" in defense_table(rows) and "| fs | noise | linf 8/255 |" in defense_table(rows)
    only_transfer = DefenseSettings(**{**settings.to_dict(), "fs": settings.fs, "noise_linf": ()})
    assert "noise" not in {r["protocol"] for r in evaluate_defense(model, processor, items, items, only_transfer, progress=False)}


def test_the_noise_control_is_random_signs_at_the_budget_the_same_for_every_variant():
    from fs_mllm.defense import _sign_noise

    x = images(2, seed=0) * 0.5 + 0.25  # away from the [0,1] edges, so nothing is clipped
    moved = _sign_noise(x, 8 / 255, seed=0)
    assert torch.allclose((moved - x).abs(), torch.full_like(x, 8 / 255), atol=1e-6)
    signs = torch.sign(moved - x)
    assert 0.4 < (signs > 0).float().mean() < 0.6  # both signs, about half each
    assert torch.equal(_sign_noise(x, 8 / 255, seed=0), moved)  # replayed identically
    assert not torch.equal(_sign_noise(x, 8 / 255, seed=1), moved)
    edge = _sign_noise(torch.ones(1, 3, 4, 4), 16 / 255, seed=0)
    assert edge.max() <= 1 and edge.min() >= 1 - 16 / 255 - 1e-6  # clipped to valid pixels
    assert DefenseSettings(transfer_linf=(4 / 255,)).noise_budgets == (4 / 255,)  # default: the transfer budgets
    assert dataclasses.replace(DefenseSettings(), transfer_linf=(16 / 255,)).noise_budgets == (16 / 255,)
    for bad, message in ((dict(crop_scale=(0.9, 0.1)), "crop_scale"), (dict(transfer_step_size=0.0), "step_size")):
        with pytest.raises(ValueError, match=message) as refused:
            DefenseSettings(**bad)
        assert not str(refused.value).startswith(("transfer_linf", "noise_linf"))  # blamed on the parameter itself
    with pytest.raises(ValueError, match="noise_linf: eps=16"):
        DefenseSettings(noise_linf=(16,))


def _resume_setup(**overrides):
    processor = tiny_processor()
    x, target = images(2, seed=0), images(2, seed=5)
    items = [EvalItem(x[i], "what?", ["a"], target[i], "<image> what?") for i in range(2)]
    settings = DefenseSettings(**{"variants": ("base", "fs"), "fs": FSConfig(n_samples=2), "transfer_linf": (8 / 255,),
                                  "transfer_steps": 2, "crop_scale": None, "adaptive_l2": (0.0625,), "adaptive_linf": (),
                                  "adaptive_steps": 1, "eot_samples": 2, "certify_images": 1, "certify_n": 20,
                                  "max_new_tokens": 2, **overrides})
    return processor, items, settings


def test_a_checkpoint_with_its_own_alpha_resumes_where_it_was_fs_alpha(model, tmp_path):
    """DefenseSettings used to have an alpha beside fs.alpha; a checkpoint that stored the two equal (every run
    did by default) resumes, one whose certificates used another alpha is refused, naming both; one that
    certified nothing resumes whatever its alpha was."""
    from fs_mllm.results import SettingsMismatchError

    processor, items, settings = _resume_setup(variants=("fs",), transfer_linf=(), adaptive_l2=())
    folder = tmp_path / "run.parts"
    first = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    stored = json.loads((folder / "settings.json").read_text())
    assert "alpha" not in stored["settings"] and stored["settings"]["fs"]["alpha"] == settings.fs.alpha
    stored["settings"]["alpha"] = settings.fs.alpha
    (folder / "settings.json").write_text(json.dumps(stored))
    assert evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder) == first
    stored["settings"]["alpha"] = 0.05
    (folder / "settings.json").write_text(json.dumps(stored))
    with pytest.raises(SettingsMismatchError, match=r"alpha=0\.05 while its smoothing's alpha \(fs\.alpha\) was 0\.001"):
        evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    from fs_mllm.defense import _one_alpha

    uncertified = {**stored, "settings": {**stored["settings"], "certify_images": 0}}
    assert "alpha" not in _one_alpha(folder, uncertified)["settings"]
    for odd in ({"settings": {"alpha": 0.05, "fs": "junk"}}, {"settings": "junk"}, []):
        assert _one_alpha(folder, odd) == odd  # left as stored: the comparison names what differs


def test_a_killed_defense_run_resumes_to_the_same_rows(model, tmp_path, monkeypatch):
    processor, items, settings = _resume_setup()
    unbroken = evaluate_defense(model, processor, items, items, settings, progress=False)
    folder = tmp_path / "run.parts"
    first = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    assert first == unbroken  # the checkpoint changes nothing computed
    assert (folder / f"transfer_linf_{8 / 255!r}.safetensors").exists()
    # a kill: the last two rows never written, the one before torn mid-line
    lines = (folder / "rows.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 10  # per variant: its state, the clean row, noise, transfer, adaptive
    (folder / "rows.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])
    crafted = []
    real_attack = fs_mllm.defense.attack

    def counting_attack(*args, **kwargs):
        crafted.append(args[4].protocol)
        return real_attack(*args, **kwargs)

    monkeypatch.setattr(fs_mllm.defense, "attack", counting_attack)
    resumed = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    assert resumed == unbroken
    assert crafted == ["adaptive"]  # fs's adaptive row only: the transfer images are read back, not crafted again
    assert not is_patched(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run must not attack again")

    monkeypatch.setattr(fs_mllm.defense, "attack", refuse)
    assert evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder) == unbroken


def _tiny_booster(seed: int):
    from fs_mllm.booster.model import GaussianSmoothnessBooster, GSBConfig

    torch.manual_seed(seed)
    return GaussianSmoothnessBooster(GSBConfig(feature_dim=32, denoiser_channels=4, denoiser_depth=2, denoiser_downscale=1,
                                               mapper_hidden=16, mapper_layers=1, sigma_embed_dim=8)).eval()


def test_a_resumed_defense_run_may_change_variants_and_budgets_but_not_settings(model, tmp_path, monkeypatch):
    from fs_mllm.results import ResultsFolderError

    processor, items, settings = _resume_setup(variants=("base",), adaptive_l2=())
    folder = tmp_path / "run.parts"
    base_rows = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    assert [r["protocol"] for r in base_rows] == ["clean", "noise", "transfer"]
    # the noise control's budgets only choose rows: a later call may add one, and reads the rest back
    wider = _resume_setup(variants=("base",), adaptive_l2=(), noise_linf=(4 / 255, 8 / 255))[2]
    widened = evaluate_defense(model, processor, items, items, wider, progress=False, checkpoint=folder)
    assert [(r["protocol"], r["eps"]) for r in widened] == [("clean", 0.0), ("noise", 4 / 255), ("noise", 8 / 255),
                                                          ("transfer", 8 / 255)]
    assert widened[2:] == base_rows[1:]
    # a later call adds a budget and a variant (with a booster the first call never had): base's rows and
    # the transfer images are read back, not recomputed
    calls = []
    real_attack = fs_mllm.defense.attack
    monkeypatch.setattr(fs_mllm.defense, "attack", lambda *a, **k: calls.append(a[4].protocol) or real_attack(*a, **k))
    _, _, more = _resume_setup(variants=("base", "fs+gsb"))
    booster = _tiny_booster(0)
    rows = evaluate_defense(model, processor, items, items, more, booster=booster, progress=False, checkpoint=folder)
    assert rows[:3] == base_rows and [(r["variant"], r["protocol"]) for r in rows[3:]] == [
        ("base", "adaptive"), ("fs+gsb", "clean"), ("fs+gsb", "noise"), ("fs+gsb", "transfer"), ("fs+gsb", "adaptive")]
    assert calls == ["adaptive", "adaptive"]  # base's and fs+gsb's new adaptive rows; no transfer crafting
    unbroken = evaluate_defense(model, processor, items, items, more, booster=booster, progress=False)
    assert rows == unbroken
    # the crop fields came later and stay out of the identity at their old values: older folders resume
    assert not {"crop_views", "crop_full_view"} & set(json.loads((folder / "settings.json").read_text())["settings"])
    before = (folder / "rows.jsonl").read_text()
    for kwargs, message in (
            ({"settings": _resume_setup(transfer_steps=3)[2]}, "settings.transfer_steps"),
            ({"settings": _resume_setup(crop_scale=(0.5, 1.0), crop_views=2)[2]}, "settings.crop_views"),
            ({"settings": _resume_setup(crop_scale=(0.5, 1.0), crop_views=2, crop_full_view=True)[2]}, "settings.crop_full_view"),
            ({"settings": _resume_setup(fs=FSConfig(n_samples=2, sigma=0.5))[2]}, "settings.fs.sigma"),
            ({"attack_items": items[:1]}, "attack_items"),
            ({"booster": _tiny_booster(1)}, "another booster")):
        call = {"settings": more, "attack_items": items, "booster": booster, **kwargs}
        with pytest.raises(ResultsFolderError, match=message):
            evaluate_defense(model, processor, items, call["attack_items"], call["settings"], booster=call["booster"],
                             progress=False, checkpoint=folder)
    with torch.no_grad():  # another model (a retrained checkpoint) is another run
        next(model.parameters()).mul_(1.5)
    with pytest.raises(ResultsFolderError, match="model"):
        evaluate_defense(model, processor, items, items, more, booster=booster, progress=False, checkpoint=folder)
    assert (folder / "rows.jsonl").read_text() == before  # a refused run writes nothing


def test_transfer_images_of_another_run_are_replayed_at_another_n0_and_checked_first(model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fs_mllm.results import SettingsMismatchError

    processor, items, settings = _resume_setup(adaptive_l2=(), noise_linf=(), transfer_linf=(8 / 255, 16 / 255))
    source = tmp_path / "crafted.parts"
    first = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=source)
    (source / f"transfer_linf_{16 / 255!r}.safetensors").unlink()  # a budget the source lacks is crafted here
    calls = []
    real_attack = fs_mllm.defense.attack
    monkeypatch.setattr(fs_mllm.defense, "attack", lambda *a, **k: calls.append(a[4].eps) or real_attack(*a, **k))
    # another n0 and other clean questions: what reusing crafted images is for
    other_n0 = _resume_setup(adaptive_l2=(), noise_linf=(), transfer_linf=(8 / 255, 16 / 255), fs=FSConfig(n_samples=3))[2]
    folder = tmp_path / "n0_3.parts"
    rows = evaluate_defense(model, processor, items[:1], items, other_n0, progress=False, checkpoint=folder,
                            transfer_images=source)
    assert calls == [16 / 255]  # only the budget the source had no images for
    name = f"transfer_linf_{8 / 255!r}.safetensors"
    torch.testing.assert_close(load_file(str(folder / name))["adv"], load_file(str(source / name))["adv"], rtol=0, atol=0)
    base_8 = [r for r in rows if r["variant"] == "base" and r["protocol"] == "transfer" and r["eps"] == 8 / 255]
    assert base_8 == [r for r in first if r["variant"] == "base" and r["protocol"] == "transfer" and r["eps"] == 8 / 255]
    assert rows == evaluate_defense(model, processor, items[:1], items, other_n0, progress=False)  # as if crafted here
    # a folder written before the crop fields existed (its settings lack them) crafted what their old values craft
    stored = json.loads((source / "settings.json").read_text())
    assert "crop_views" not in stored["settings"] and "crop_full_view" not in stored["settings"]
    untouched = {f.name: f.read_bytes() for f in source.iterdir()}
    # a source crafted otherwise, or no checkpoint at all, is refused before any work, naming what differs
    calls.clear()
    for kwargs, given, message in (
            ({"transfer_steps": 3}, source, "crafted its images otherwise .*settings.transfer_steps"),
            ({"transfer_step_size": 2 / 255}, source, "settings.transfer_step_size"),
            ({"seed": 1}, source, "settings.seed"),
            ({"crop_scale": (0.5, 1.0)}, source, "settings.crop_scale"),
            ({"crop_scale": (0.5, 1.0), "crop_views": 2}, source, "settings.crop_views"),
            ({"surrogates": ("dinov2",)}, source, "settings.surrogates"),
            ({}, tmp_path / "nothing", "transfer_images must be a defense checkpoint folder")):
        other = _resume_setup(adaptive_l2=(), noise_linf=(), fs=FSConfig(n_samples=3), **kwargs)[2]
        with pytest.raises(SettingsMismatchError, match=message):
            evaluate_defense(model, processor, items, items, other, progress=False, checkpoint=tmp_path / "refused",
                             transfer_images=given)
    with pytest.raises(SettingsMismatchError, match="attack_items"):
        evaluate_defense(model, processor, items, items[:1], other_n0, progress=False, transfer_images=source)
    with torch.no_grad():  # another model (retrained weights) crafts other images
        next(model.parameters()).mul_(1.5)
    with pytest.raises(SettingsMismatchError, match="model"):
        evaluate_defense(model, processor, items, items, other_n0, progress=False, transfer_images=source)
    with torch.no_grad():
        next(model.parameters()).div_(1.5)
    assert calls == [] and not (tmp_path / "refused").exists()
    assert {f.name: f.read_bytes() for f in source.iterdir()} == untouched  # read only


def test_kept_adaptive_images_are_replayed_only_for_the_same_smoothing_attack_and_booster(model, tmp_path, monkeypatch):
    """keep_adaptive_images keeps each adaptive batch in the checkpoint; another run naming it as adaptive_images
    replays them (no attack) and gives the rows of a run that attacks, and refuses a folder crafted otherwise."""
    from fs_mllm.results import SettingsMismatchError

    x, target = images(3, seed=0), images(3, seed=5)
    items = [EvalItem(x[i], "what?", ["a"], target[i], "<image> what?") for i in range(3)]
    processor, _, settings = _resume_setup(variants=("base", "fs+gsb"), transfer_linf=(), noise_linf=(),
                                           adaptive_examples=2, attack_batch_size=1, certify_images=2)
    booster = _tiny_booster(0)
    with pytest.raises(ValueError, match="pass checkpoint= too"):
        evaluate_defense(model, processor, items, items, settings, booster=booster, progress=False, keep_adaptive_images=True)
    source = tmp_path / "adaptive.parts"
    live = evaluate_defense(model, processor, items, items, settings, booster=booster, progress=False, checkpoint=source,
                            keep_adaptive_images=True)
    adaptive_rows = [r for r in live if r["protocol"] == "adaptive"]
    assert [r["n"] for r in adaptive_rows] == [2, 2] and all(r["n"] == 3 for r in live if r["protocol"] == "clean")
    kept = sorted(p.name for p in source.glob("adaptive_*.safetensors"))
    assert kept == [f"adaptive_{v}_l2_{0.0625!r}_from{i}.safetensors" for v in ("base", "fs+gsb") for i in (0, 1)]
    untouched = {f.name: f.read_bytes() for f in source.iterdir()}
    calls = []
    real_attack, real_generate = fs_mllm.defense.attack, fs_mllm.defense.generate_text
    monkeypatch.setattr(fs_mllm.defense, "attack", lambda *a, **k: calls.append("attack") or real_attack(*a, **k))
    monkeypatch.setattr(fs_mllm.defense, "generate_text", lambda *a, **k: calls.append(a[2].shape[0]) or real_generate(*a, **k))
    replayed = evaluate_defense(model, processor, items, items, settings, booster=booster, progress=False,
                                adaptive_images=source)
    assert replayed == live
    # no attack; per variant its answers on the 3 clean items (clean accuracy reuses them) and on the 2 attacked
    assert calls == [3, 2] * 2
    assert {f.name: f.read_bytes() for f in source.iterdir()} == untouched  # read only
    # another smoothing, attack or attacked count crafts other images: refused before any work, naming it
    for overrides, message in (({"fs": FSConfig(n_samples=3)}, "settings.fs"), ({"eot_samples": 3}, "settings.eot_samples"),
                               ({"adaptive_steps": 2}, "settings.adaptive_steps"),
                               ({"adaptive_examples": 3}, "settings.adaptive_examples")):
        other = _resume_setup(**{"variants": ("base", "fs+gsb"), "transfer_linf": (), "noise_linf": (), "adaptive_examples": 2,
                                 "attack_batch_size": 1, "certify_images": 2, **overrides})[2]
        with pytest.raises(SettingsMismatchError, match=f"adaptive_images .*crafted its images otherwise .*{message}"):
            evaluate_defense(model, processor, items, items, other, booster=booster, progress=False, adaptive_images=source)
    # another booster: refused before any work (and again by the file read, should the folder change meanwhile)
    calls.clear()
    with pytest.raises(SettingsMismatchError, match="another booster"):
        evaluate_defense(model, processor, items, items, settings, booster=_tiny_booster(1), progress=False,
                         adaptive_images=source)
    assert calls == []
    # adaptive rows certify only their own attacked items
    fewer = _resume_setup(variants=("fs",), transfer_linf=(), noise_linf=(), adaptive_examples=1, certify_images=2)[2]
    rows = evaluate_defense(model, processor, items, items, fewer, progress=False)
    assert [(r["protocol"], r["n"], r["certified_images"]) for r in rows] == [("clean", 3, 2), ("adaptive", 1, 1)]


def test_transfer_images_read_later_are_checked_again(model, tmp_path, monkeypatch):
    """A source claimed afresh by another run after the check, or holding images of another shape, is refused
    when its file is read, not replayed."""
    from safetensors.torch import save_file

    processor, items, settings = _resume_setup(variants=("base",), adaptive_l2=(), noise_linf=())
    source = tmp_path / "crafted.parts"
    evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=source)
    name = f"transfer_linf_{8 / 255!r}.safetensors"
    real = fs_mllm.defense._ReplaySource.read

    def claimed_meanwhile(self, *args):
        (source / "settings.json").write_text(json.dumps({"settings": {"transfer_steps": 99}}))
        return real(self, *args)

    monkeypatch.setattr(fs_mllm.defense._ReplaySource, "read", claimed_meanwhile)
    with pytest.raises(ValueError, match="claimed by another run since it was checked"):
        evaluate_defense(model, processor, items, items, settings, progress=False, transfer_images=source)
    monkeypatch.undo()
    source2 = tmp_path / "again.parts"
    evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=source2)
    save_file({"adv": torch.zeros(1, 3, 4, 4)}, str(source2 / name))
    with pytest.raises(ValueError, match="holds images of shape"):
        evaluate_defense(model, processor, items, items, settings, progress=False, transfer_images=source2)


def test_every_defense_setting_is_known_to_change_the_crafting_or_not():
    """A field added to DefenseSettings must be sorted into crafting (checked when images are reused) or not."""
    from fs_mllm.defense import _ADAPTIVE_FIELDS, _CRAFTING_FIELDS, _ROW_CHOICES

    replay_only = {"certify_images", "certify_n", "max_new_tokens"}
    fields = {f.name for f in dataclasses.fields(DefenseSettings)}
    assert fields == set(_CRAFTING_FIELDS) | set(_ADAPTIVE_FIELDS) | set(_ROW_CHOICES) | replay_only
    assert not (set(_CRAFTING_FIELDS) | set(_ADAPTIVE_FIELDS)) & (set(_ROW_CHOICES) | replay_only)


def test_an_adaptive_attack_runs_in_batches_and_a_stop_loses_at_most_one(model, tmp_path, monkeypatch):
    processor = tiny_processor()
    x, target = images(3, seed=0), images(3, seed=5)
    items = [EvalItem(x[i], "what?", ["a"], target[i], "<image> what?") for i in range(3)]
    settings = _resume_setup(transfer_linf=(), attack_batch_size=2)[2]
    sizes = []
    real_attack = fs_mllm.defense.attack

    def counting_attack(model, processor, images, *args, **kwargs):
        sizes.append(len(images))
        return real_attack(model, processor, images, *args, **kwargs)

    monkeypatch.setattr(fs_mllm.defense, "attack", counting_attack)
    unbroken = evaluate_defense(model, processor, items, items, settings, progress=False)
    assert sizes == [2, 1, 2, 1]  # base, then fs: 3 images in batches of 2
    # a stop in the middle of fs's adaptive row: its first batch is kept, only the second is attacked again
    sizes.clear()
    folder = tmp_path / "run.parts"

    def stop_on_the_fourth(model, processor, images, *args, **kwargs):
        if len(sizes) == 3:
            raise KeyboardInterrupt
        return counting_attack(model, processor, images, *args, **kwargs)

    monkeypatch.setattr(fs_mllm.defense, "attack", stop_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    assert [p.name for p in folder.glob("adaptive_*")] == [f"adaptive_fs_l2_{0.0625!r}_from0.safetensors"]
    sizes.clear()
    monkeypatch.setattr(fs_mllm.defense, "attack", counting_attack)
    assert evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder) == unbroken
    assert sizes == [1]
    assert not list(folder.glob("adaptive_*"))  # kept only until the row was written
    with pytest.raises(ValueError, match="attack_batch_size"):
        DefenseSettings(attack_batch_size=0)


def test_a_checkpoint_is_claimed_afresh_only_while_it_holds_no_results(model, tmp_path):
    from fs_mllm.results import ResultsFolderError

    processor, items, settings = _resume_setup(variants=("base",), adaptive_l2=())
    folder = tmp_path / "run.parts"
    folder.mkdir()
    (folder / "settings.json").write_text('{"settings": {"transfer_steps": 99}}')  # its run stopped before any result
    rows = evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    assert json.loads((folder / "settings.json").read_text())["settings"]["transfer_steps"] == 2
    assert rows == evaluate_defense(model, processor, items, items, settings, progress=False)
    (folder / "rows.jsonl").write_text("")  # every row lost, but the crafted images are results too
    with pytest.raises(ResultsFolderError, match="settings.transfer_steps: stored 2, now 3"):
        evaluate_defense(model, processor, items, items, _resume_setup(variants=("base",), adaptive_l2=(), transfer_steps=3)[2],
                         progress=False, checkpoint=folder)


def test_a_checkpoint_with_rows_but_no_settings_or_a_torn_image_file_is_refused(model, tmp_path):
    from fs_mllm.results import ResultsFolderError

    processor, items, settings = _resume_setup(variants=("base",), adaptive_l2=())
    folder = tmp_path / "run.parts"
    evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    (folder / "settings.json").rename(tmp_path / "settings.json")
    with pytest.raises(ResultsFolderError, match="no settings.json"):
        evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)
    (tmp_path / "settings.json").rename(folder / "settings.json")
    (folder / "rows.jsonl").write_text("")  # every row lost: the transfer images must be read back
    [images_file] = folder.glob("transfer_linf_*.safetensors")
    images_file.write_bytes(images_file.read_bytes()[:40])
    with pytest.raises(ResultsFolderError, match="delete it and rerun"):
        evaluate_defense(model, processor, items, items, settings, progress=False, checkpoint=folder)


# ---------------------------------------------------------------------------------------------
# the demo, as a user runs it
# ---------------------------------------------------------------------------------------------

def test_demo_console_script_on_tiny_settings(tmp_path):
    script = shutil.which("fs-mllm")
    assert script, "the fs-mllm console script is not installed (pip install -e .)"
    out = tmp_path / "demo"
    result = subprocess.run([script, "demo", "--examples", "2", "--adaptive-examples", "1", "--n-samples", "2",
                             "--certify-n", "10", "--transfer-steps", "1", "--steps", "1", "--eot-samples", "1",
                             "--max-new-tokens", "2", "--output-dir", str(out)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    protocols = {(r["variant"], r["protocol"]) for r in summary["rows"]}
    assert protocols == {(v, p) for v in ("base", "fs", "fs+gsb") for p in ("clean", "noise", "transfer", "adaptive")}
    counts = {r["protocol"]: r["n"] for r in summary["rows"]}
    assert counts["transfer"] == counts["noise"] == 2 and counts["adaptive"] == 1
    assert summary["settings"]["transfer_images"] == "crafted"  # not the shipped count: crafted in the run
    assert summary["settings"]["adaptive_images"] == "crafted"
    assert counts["clean"] == 2  # clean accuracy on the attacked questions themselves
    report = (out / "report.md").read_text()
    assert "Transfer" in report and "Adaptive" in report and "Noise" in report and "linf 16/255" in report
    # the terminal: the table with its counts, one reading per protocol, the certificates' share
    assert "right before -> after" in result.stdout and "transfer linf 16/255" in result.stdout
    assert "right before -> after:" in result.stdout and "clean (" in result.stdout
    assert "certified, within l2 0.125 of the clean image" in result.stdout
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0


@pytest.mark.parametrize("bad, needle", [(["--sigma", "0"], "--sigma"), (["--examples", "0"], "--examples"),
                                         (["--alpha", "2"], "--alpha"), (["--n-samples", "x"], "--n-samples")])
def test_demo_refuses_bad_arguments_before_loading(bad, needle, tmp_path, capsys):
    from fs_mllm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", *bad, "--output-dir", str(tmp_path / "d")])
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_refuses_more_adaptive_examples_than_examples(tmp_path, monkeypatch, capsys):
    import fs_mllm.models.loading as loading
    from fs_mllm.cli import main
    from fs_mllm.demo import DemoSettings

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(SystemExit) as exc:  # a usage error, before any work
        main(["demo", "--examples", "4", "--adaptive-examples", "5", "--output-dir", str(tmp_path / "d")])
    assert exc.value.code == 2 and "--adaptive-examples 5 is more than --examples 4" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="adaptive_examples 5 is more than examples 4"):  # the same from Python
        DemoSettings(examples=4, adaptive_examples=5)


def test_demo_adaptive_count_defaults_to_the_shipped_count_or_every_example():
    import argparse

    from fs_mllm import demo
    from fs_mllm.commands import demo as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.settings_from_args(parser.parse_args([])) == demo.DemoSettings()  # the command's defaults are its
    assert demo.defense_settings(demo.DemoSettings()).adaptive_examples == demo.SHIPPED_ADAPTIVE_EXAMPLES
    few = demo.defense_settings(demo.DemoSettings(examples=4))  # fewer examples than the shipped count
    assert few.adaptive_examples == few.certify_images == 4
    assert demo.defense_settings(command.settings_from_args(parser.parse_args(["--adaptive-examples", "3"]))).adaptive_examples == 3


def test_the_shipped_images_fit_the_demo():
    """The demo replays fs_mllm/data/demo_transfer and demo_adaptive only if they were crafted as this run would
    (same model weights, attack images, crafting settings; for the adaptive images also the smoothing, the
    attack's settings and the booster): a change to any of them must show here, not in a user's demo."""

    from fs_mllm import demo
    from fs_mllm.defense import _ReplaySource, module_fingerprint

    args = demo.DemoSettings()
    assert demo.uses_shipped_transfer(args) and demo.uses_shipped_adaptive(args)
    assert not demo.uses_shipped_adaptive(demo.DemoSettings(sigma=0.5))  # other settings attack live
    settings = demo.defense_settings(args)
    model, processor, booster, items = demo._load(args)
    images = torch.stack([item.image for item in items])
    source = _ReplaySource(demo.SHIPPED_TRANSFER, settings, items, model, processor)
    [name] = [p.name for p in demo.SHIPPED_TRANSFER.glob("transfer_linf_*.safetensors")]
    adv = source.read(name, images)["adv"]
    assert adv.shape == images.shape
    assert (adv - images).abs().max().item() <= 16 / 255 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    assert (adv - images).abs().max().item() > 8 / 255  # crafted, not a copy
    adaptive = _ReplaySource(demo.SHIPPED_ADAPTIVE, settings, items, model, processor, kind="adaptive")
    first = images[:demo.adaptive_count(args)]
    files = sorted(p.name for p in demo.SHIPPED_ADAPTIVE.glob("adaptive_*.safetensors"))
    assert files == sorted(f"adaptive_{v}_l2_{float(e)!r}_from0.safetensors" for v in settings.variants
                           for e in settings.adaptive_l2)
    for name in files:
        variant, eps = name.split("_")[1], float(name.split("_")[3])
        kept = adaptive.read(name, first, booster=module_fingerprint(booster) if variant == "fs+gsb" else None)
        delta = (kept["adv"] - first).flatten(1).norm(dim=1)
        assert delta.max().item() <= eps * (1 + 1e-4) and delta.max().item() > eps / 2  # attacked, within its budget
        assert kept["fcs"].shape == (demo.adaptive_count(args),)
    with pytest.raises(ValueError, match="another booster"):
        adaptive.read(next(n for n in files if "fs+gsb" in n), first, booster="0" * 32)


def test_the_demo_points_the_same_way_as_the_one_table(tmp_path):
    """benchmarks/results/demo_cpu.json (a default `fs-mllm demo` run) against the one table's result files, and
    the check fails on a demo whose FS+GSB transfer row is flipped (so it can fail)."""
    import sys

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "check_demo.py"
    committed = root / "benchmarks" / "results" / "demo_cpu.json"
    proc = subprocess.run([sys.executable, str(script), str(committed)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agrees" in proc.stdout and "DISAGREES" not in proc.stdout
    record = json.loads(committed.read_text())
    rows = record["rows"]
    base = next(r for r in rows if r["variant"] == "base" and r["protocol"] == "transfer")
    for row in rows:
        if row["variant"] == "fs+gsb" and row["protocol"] == "transfer":
            row["accuracy"] = base["accuracy"] - 0.25
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps({**record, "rows": rows}))
    proc = subprocess.run([sys.executable, str(script), str(flipped)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DISAGREES" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.full_demo
def test_the_committed_demo_figures_are_what_the_default_demo_prints(tmp_path):
    """The default `fs-mllm demo`, as a user runs it, gives the rows of benchmarks/results/demo_cpu.json."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([shutil.which("fs-mllm"), "demo", "--output-dir", str(tmp_path / "demo")], capture_output=True,
                            text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "demo" / "summary.json").read_text())["rows"]
    committed = json.loads((root / "benchmarks" / "results" / "demo_cpu.json").read_text())["rows"]
    assert [{k: r[k] for k in ("variant", "protocol", "eps", "n", "right_before", "right_after")} for r in rows] == \
        [{k: r[k] for k in ("variant", "protocol", "eps", "n", "right_before", "right_after")} for r in committed]


def test_attack_command_transfer_protocol_as_a_user_runs_it(tmp_path, monkeypatch, capsys):
    """`fs-mllm attack --protocol transfer --objective feature_target --target-image ...` on the embedded model.
    The first run as the installed script; the rerun with two views and the refusals in-process through the same
    entry point (console_main: same parser, exit status and output)."""
    from console_script import console_in_process
    from fs_mllm.synthetic import make_example

    target = tmp_path / "target.png"
    make_example(3, split="heldout", size=112).image.save(target)
    out = tmp_path / "attack"
    command = [shutil.which("fs-mllm"), "attack", "--offline-eval", "vqa", "--limit", "1", "--protocol", "transfer",
               "--objective", "feature_target", "--target-image", str(target), "--norm", "linf", "--eps", str(16 / 255),
               "--steps", "1", "--crop-scale", "0.5,1", "--modes", "base,fs", "--n-samples", "2",
               "--max-new-tokens", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"base", "fs"}
    assert all(r["attack"]["protocol"] == "transfer" and r["attack"]["objective"] == "feature_target" for r in rows)
    from PIL import Image
    import numpy as np

    base_png, fs_png = (np.asarray(Image.open(r["adv_image"])) for r in sorted(rows, key=lambda r: r["mode"]))
    assert np.array_equal(base_png, fs_png)  # crafted once, without the defense
    bad = console_in_process([*command[1:-2], "--out", str(tmp_path / "bad"), "--surrogates", "resnet"], monkeypatch, capsys)
    assert bad.returncode == 2 and "--surrogates" in bad.stderr
    lone = console_in_process([*command[1:-2], "--out", str(tmp_path / "lone"), "--ensemble-weighting", "gradient"],
                              monkeypatch, capsys)  # a weighting of no ensemble
    assert lone.returncode == 2 and "--ensemble-weighting" in lone.stderr and not (tmp_path / "lone").exists()
    missing = console_in_process([c for c in command[1:] if c not in ("--target-image", str(target))], monkeypatch, capsys)
    assert missing.returncode == 2 and "--target-image" in missing.stderr
    # two views per gradient, the first one whole: rows of their own settings beside the first run's
    views = console_in_process([*command[1:], "--crop-views", "2", "--crop-full-view"], monkeypatch, capsys)
    assert views.returncode == 0, views.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["attack"]["crop_views"], r["attack"]["crop_full_view"]) for r in rows) == [(1, False)] * 2 + [(2, True)] * 2
    assert len({r["key"][2] for r in rows}) == 2
    whole = console_in_process([*command[1:-2], "--out", str(tmp_path / "whole"), "--crop-full-view"], monkeypatch, capsys)
    assert whole.returncode == 2 and "set --crop-views >= 2" in whole.stderr and not (tmp_path / "whole").exists()
