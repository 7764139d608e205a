"""The supported transformers range: one statement (fs_mllm.compat), the same in setup.cfg, enforced at patch_model."""

from __future__ import annotations

import configparser
import importlib
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from fs_mllm import compat, patch_model, testing as tiny_models
from fs_mllm.adapters import get_adapter
from fs_mllm.patching import is_patched, unpatch_model

ROOT = Path(__file__).resolve().parent.parent


def setup_cfg_requirement(name: str) -> SpecifierSet:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    for line in parser["options"]["install_requires"].split("\n"):
        if line.strip().startswith(name):
            return SpecifierSet(line.strip()[len(name):])
    raise AssertionError(f"setup.cfg does not require {name}")


def test_setup_cfg_states_the_supported_range_with_an_upper_bound():
    declared = setup_cfg_requirement("transformers")
    assert declared == compat.SUPPORTED_TRANSFORMERS
    assert any(spec.operator == "<" for spec in declared), "an open-ended range lets CI pick an untested release"


def test_the_installed_transformers_is_supported():
    assert compat.transformers_version() in compat.SUPPORTED_TRANSFORMERS, compat.installed_transformers()


@pytest.mark.parametrize("version", ["5.23.0", "5.26.0", "6.0.0.dev0"])
def test_an_untested_version_is_refused_at_patch_model_with_the_fix(monkeypatch, version):
    monkeypatch.delenv(compat.UNTESTED_OVERRIDE, raising=False)
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    model, _ = tiny_models.build_llava()
    with pytest.raises(RuntimeError) as error:
        patch_model(model, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    message = str(error.value)
    assert version in message and str(compat.SUPPORTED_TRANSFORMERS) in message and "pip install" in message
    assert not is_patched(model)


def test_the_override_patches_an_untested_version_with_a_warning(monkeypatch):
    monkeypatch.setenv(compat.UNTESTED_OVERRIDE, "1")
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "5.26.0")
    model, _ = tiny_models.build_llava()
    with pytest.warns(UserWarning, match="untested"):
        patch_model(model, sigma=0.25, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert is_patched(model)


def test_a_dev_build_compares_as_its_release(monkeypatch):
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "5.25.0.dev0")
    assert compat.transformers_version() in compat.SUPPORTED_TRANSFORMERS


def test_llama4_smooths_the_field_its_forward_reads():
    """5.25 runs the projector inside get_image_features and forward reads pooler_output; 5.24 reads
    last_hidden_state and projects it itself. The smoothed field must be the one forward reads, populated."""
    model, inputs = tiny_models.FAMILIES["llama4"]()
    adapter = get_adapter(model)
    owner = adapter.feature_owner(model)
    read_by_forward = "pooler_output" if compat.at_least("5.25") else "last_hidden_state"
    assert adapter.feature_fields == (read_by_forward,)
    with torch.no_grad():
        clean = owner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)[read_by_forward]
        patch_model(model, sigma=0.5, n_samples=4, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        smoothed = owner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)[read_by_forward]
        unpatch_model(model)
    assert smoothed is not None and smoothed.shape == clean.shape
    assert smoothed.shape[-1] == adapter.feature_dim(model)
    assert not torch.allclose(smoothed, clean), "the field forward reads was passed through unsmoothed"


def test_from_pretrained_refuses_an_untested_version_before_loading(monkeypatch, tmp_path):
    import fs_mllm.hub.io as hub

    monkeypatch.delenv(compat.UNTESTED_OVERRIDE, raising=False)
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "5.26.0")
    monkeypatch.setattr(hub, "load_base", lambda *a, **k: pytest.fail("weights were loaded before the version check"))
    with pytest.raises(RuntimeError, match="outside the range"):
        hub.from_pretrained(tmp_path)
