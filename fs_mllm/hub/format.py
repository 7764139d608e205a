"""The saved-patch format: ``fs_config.json`` (read strictly), the files beside it and the checks they share.

A patched model saves the way PEFT saves an adapter: ``fs_config.json`` (the FSConfig, the processor
mean/std the noise is defined with, the family, a format version and the base model: a Hub repo id +
revision, or "weights included"), the booster as ``gsb.safetensors`` + ``gsb_config.json`` at the top of
the folder (so the folder is also a booster folder), the processor files, and a model card ``README.md``.
This module knows the layout only: no model is loaded or patched here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..config import FSConfig, dataclass_from_dict
from ..version import __version__

FS_CONFIG_NAME = "fs_config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
# Never fetched from a repo: pickle weights can run code on load, and code files only matter with
# trust_remote_code, which fs_mllm never sets.
UNSAFE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.py", "*.h5", "*.msgpack", "*.ot"]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
PathLike = Union[str, os.PathLike]


@dataclass
class SavedPatch:
    """The content of ``fs_config.json`` (read strictly: unknown, missing or mistyped keys are refused).

    format_version: layout version (a newer file is refused, not guessed at). family: the base model's
    ``config.model_type``. fs_config: the FSConfig fields. image_mean/image_std: the processor's
    per-channel normalisation that sigma (std in [0,1] pixel space) is translated through.
    weights_included: the base weights are in the folder (safetensors); otherwise base_model (a Hub
    repo id) at base_revision (a commit; None = the latest) is loaded. base_model is kept as provenance
    when the weights are included. booster: gsb.safetensors + gsb_config.json are in the folder.
    """

    format_version: int
    family: str
    fs_config: dict
    image_mean: list
    image_std: list
    weights_included: bool
    base_model: Optional[str] = None
    base_revision: Optional[str] = None
    booster: bool = False
    fs_mllm_version: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# fs_config.json

def read_saved_patch(path: PathLike) -> SavedPatch:
    """Read and validate ``fs_config.json``; every error names the file and the fix."""
    path = Path(path)
    resave = "save the patched model again with fs_mllm.save_pretrained"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the folder was not saved by fs_mllm.save_pretrained; {resave}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({error}); the file is damaged: {resave}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}; {resave}")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has no valid format_version (got {version!r}); {resave}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this fs_mllm "
                         f"({__version__}) reads: upgrade fs_mllm (pip install -U fs-mllm)")
    try:
        record = dataclass_from_dict(SavedPatch, data)
        FSConfig.from_dict(record.fs_config)
        for name in ("image_mean", "image_std"):
            values = getattr(record, name)
            if len(values) != 3 or not all(finite_number(v) for v in values):
                raise ValueError(f"{name} must be 3 finite per-channel numbers, got {values!r}")
        if not all(v > 0 for v in record.image_std):
            raise ValueError(f"image_std must be positive, got {record.image_std!r}")
        check_family(record.family)
        if not record.weights_included and not record.base_model:
            raise ValueError("base_model is required when weights_included is false (which model to load)")
        if record.base_model is not None:
            check_repo_id(record.base_model, "base_model")
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}; {resave}") from None
    return record


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_family(family: str) -> None:
    from ..adapters import supported_model_types

    if family not in supported_model_types():
        raise ValueError(f"family {family!r} is not supported; fs_mllm patches {supported_model_types()}")


def check_repo_id(repo_id: Any, name: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"got {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{name} must be a Hub repo id ('org/name'), got {repo_id!r} ({error})") from None
    return repo_id


def write_patch_files(folder: Path, record: SavedPatch, booster: Any, card: Optional[str]) -> None:
    """Booster, card, then fs_config.json last: a folder with fs_config.json is complete."""
    from ..booster.model import CONFIG_NAME, WEIGHTS_NAME

    (folder / FS_CONFIG_NAME).unlink(missing_ok=True)
    if booster is not None:
        booster.save_pretrained(folder)
    else:
        for stale in (WEIGHTS_NAME, CONFIG_NAME):  # a booster of an earlier save would be loaded with this patch
            (folder / stale).unlink(missing_ok=True)
    if card is not None:
        (folder / CARD_NAME).write_text(card, encoding="utf-8")
    (folder / FS_CONFIG_NAME).write_text(record.to_json(), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------
