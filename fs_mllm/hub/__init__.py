"""Patched models as Hub repositories: the saved format, model cards, and resolve / load / save / push.

``format`` is the folder layout (``fs_config.json`` and the files beside it), ``card`` the model card, ``io``
the Hub and the HF cache. The HF cache layout written locally and the embedded model's repo live in
:mod:`fs_mllm.models` (``hf_cache``, ``mini_llava``), above this package.
"""

from .card import RESULT_KEYS, render_card, render_results
from .format import FORMAT_VERSION, FS_CONFIG_NAME, SavedPatch, read_saved_patch
from .io import (from_pretrained, is_saved_patch, load_base, load_safetensors_model, patch_from_saved, push_to_hub,
                 register_local_repo, resolve_folder, save_pretrained)

__all__ = [
    "FORMAT_VERSION",
    "FS_CONFIG_NAME",
    "RESULT_KEYS",
    "SavedPatch",
    "from_pretrained",
    "is_saved_patch",
    "load_base",
    "load_safetensors_model",
    "patch_from_saved",
    "push_to_hub",
    "read_saved_patch",
    "register_local_repo",
    "render_card",
    "render_results",
    "resolve_folder",
    "save_pretrained",
]
