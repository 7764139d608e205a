"""Patched models as Hub repositories: resolve, load, save and push.

Hub access goes through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_repo``/``upload_folder``),
so a repo id resolves from the Hub or, with ``HF_HUB_OFFLINE=1``, from the HF cache. Repos that exist only in
the local cache (the embedded fs-mini-llava, :mod:`fs_mllm.models.hf_cache`) register a provider with
:func:`register_local_repo`, which places them there before they are resolved. Only safetensors and JSON are
ever read back, and ``trust_remote_code`` is never set on the caller's behalf.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn

from ..compat import check_transformers_version
from ..config import FSConfig
from ..version import __version__
from .card import LIBRARY_NAME, render_card
from .format import (COMMIT, FORMAT_VERSION, FS_CONFIG_NAME, PROCESSOR_FILES, UNSAFE_PATTERNS, PathLike, SavedPatch,
                     check_repo_id, read_saved_patch, write_patch_files)

LOCAL_REPOS: dict[str, Callable[[Optional[PathLike]], str]] = {}
"""Repo ids that exist only in the local HF cache, each with the function that (re)places it there (given the
cache folder, None = huggingface_hub's): never asked of the Hub."""


def register_local_repo(repo_id: str, provide: Callable[[Optional[PathLike]], str]) -> None:
    """Make ``repo_id`` resolvable offline: ``provide(cache_dir)`` places it in the HF cache before each resolution."""
    LOCAL_REPOS[check_repo_id(repo_id, "repo_id")] = provide



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
        repo_id = check_repo_id(ref, "repo_id_or_folder (not a local folder, so a Hub repo id)")
        if repo_id in LOCAL_REPOS:
            LOCAL_REPOS[repo_id](cache_dir)  # (re)placed in the cache when missing or stale
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
    if repo_id_or_folder in LOCAL_REPOS:
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


def load_safetensors_model(model_class: Any, name_or_folder: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """``model_class.from_pretrained(..., use_safetensors=True)``: the one way fs_mllm loads model weights.

    Why: pickle weights (.bin/.pt) can run arbitrary code when loaded. A local folder without
    safetensors weights gets a ValueError naming it (transformers' own error does not say why).
    """
    folder = Path(name_or_folder)
    # transformers' weight files (model.safetensors, shards, variants): other safetensors (a booster) do not count
    if folder.is_dir() and not any(folder.glob("model*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found pickle weights: {', '.join(pickles)})" if pickles else ""
        raise ValueError(
            f"model folder {str(folder)!r} has no .safetensors weights{found}; fs_mllm loads safetensors only, never "
            "pickle (it can run code on load): convert once with model.save_pretrained(folder) in a trusted environment"
        )
    kwargs.pop("output_loading_info", None)  # always asked for here: the check below needs it
    model, info = model_class.from_pretrained(name_or_folder, use_safetensors=True, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:  # transformers would fill them with random values and only log it
        named = missing[:5] + mismatched[:5]
        raise ValueError(f"model weights in {str(name_or_folder)!r} are incomplete: {len(missing)} missing and "
                         f"{len(mismatched)} of another shape (e.g. {', '.join(named)}); the model would run with random "
                         "values there. Save the folder again, or check that its files were copied whole")
    return model


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

    if repo_id_or_folder in LOCAL_REPOS and local_files_only is None:
        local_files_only = True  # placed in the cache by its provider, never on the Hub: ask nobody
    folder, repo_id = resolve_folder(repo_id_or_folder, revision, cache_dir, local_files_only, token)
    record = read_saved_patch(folder / FS_CONFIG_NAME)
    hub = _hub_kwargs(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if record.weights_included:
        # a repo id loads through transformers' own resolution, pinned to the snapshot just resolved
        source = repo_id if repo_id is not None else str(folder)
        source_revision = (folder.name if COMMIT.match(folder.name) else revision) if repo_id is not None else None
        if repo_id is None:
            hub = {}
    else:
        source, source_revision = record.base_model, record.base_revision
        if source in LOCAL_REPOS:
            LOCAL_REPOS[source](cache_dir)
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

        from ..adapters import ADAPTERS

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
    from ..adapters import get_adapter
    from ..booster.model import CONFIG_NAME, GaussianSmoothnessBooster

    booster = GaussianSmoothnessBooster.from_pretrained(folder)
    try:
        booster.check_compatible(get_adapter(model).feature_dim(model), sigma)
    except ValueError as error:
        raise ValueError(f"{folder / CONFIG_NAME}: the booster saved with this patch does not fit the model: {error}. "
                         "Save the patch again from this base model with a booster trained for it") from None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    return booster.to(device) if device is not None else booster


def _apply(model: nn.Module, folder: Path, record: SavedPatch) -> nn.Module:
    from ..adapters.base import model_type_of
    from ..patching import patch_model

    found = model_type_of(model)
    if found != record.family:
        raise _family_error(folder / FS_CONFIG_NAME, record, found, f"the model ({type(model).__name__})")
    config = FSConfig.from_dict(record.fs_config)
    booster = _saved_booster(folder, record, model, config.sigma)
    return patch_model(model, config=config, booster=booster, image_mean=record.image_mean, image_std=record.image_std)


def patch_from_saved(model: nn.Module, repo_id_or_folder: PathLike, **resolve_kwargs: Any) -> nn.Module:
    """Patch an in-memory model with the settings, mean/std and booster saved in a folder or Hub repo (no weights read).

    The PEFT split: ``fs_mllm.patch_model`` takes settings (as ``get_peft_model`` a config), this takes what
    ``save_pretrained`` wrote (as ``PeftModel`` loads an adapter folder); ``fs_mllm.from_pretrained`` also loads
    the base model.

    Args:
        model: a transformers model of the family the folder was saved for (unpatched).
        repo_id_or_folder: a local folder holding fs_config.json, or a Hub repo id (resolved from the HF cache
            when offline); only fs_config.json and the booster files are fetched.
        **resolve_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for a repo id.

    Returns:
        ``model`` itself, patched.

    Raises:
        ValueError: an invalid repo id or a file path; a damaged fs_config.json or one written by a newer
            fs_mllm; a model of another family; a saved booster that does not fit the model.
        FileNotFoundError: no fs_config.json there, or a repo that cannot be fetched (or is not in the HF
            cache when offline).
    """
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
    return name if COMMIT.match(name) else None


def _base_reference(hf_model: nn.Module, base_model: Optional[str], revision: Optional[str]) -> tuple[str, Optional[str]]:
    name = base_model or getattr(hf_model, "name_or_path", "") or ""
    if not base_model and (not name or os.path.isdir(name)):
        where = f"the local folder {name!r}" if name else "memory"
        raise ValueError(
            f"base_model: the model was loaded from {where}, which is not a Hub repo; pass base_model='org/name' "
            "(and revision=) naming where its weights are published, or include_weights=True to save them in the folder")
    check_repo_id(name, "base_model")
    if name in LOCAL_REPOS:
        warnings.warn(f"fs_mllm.save_pretrained: the base model {name} exists only in local HF caches (built by "
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
    from ..adapters.base import unwrap_model
    from ..patching import get_fs_state

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
        base_ref = check_repo_id(base_model, "base_model") if base_model is not None else None
    else:
        base_ref, revision = _base_reference(hf_model, base_model, revision)
    record = SavedPatch(
        format_version=FORMAT_VERSION, family=hf_model.config.model_type, fs_config=state.config.to_dict(),
        image_mean=[float(v) for v in state.image_mean], image_std=[float(v) for v in state.image_std],
        weights_included=bool(include_weights), base_model=base_ref, base_revision=revision,
        booster=state.booster is not None, fs_mllm_version=__version__)
    folder.mkdir(parents=True, exist_ok=True)
    if include_weights:
        hf_model.save_pretrained(folder)  # safetensors (transformers 5 writes nothing else)
    if processor is not None:
        processor.save_pretrained(folder)
    card = render_card(record, name=name or repo_id or folder.resolve().name, results=results,
                       description=description, license=license, repo_id=repo_id)
    write_patch_files(folder, record, state.booster, card)
    return folder



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

    check_repo_id(repo_id, "repo_id")
    if constants.HF_HUB_OFFLINE:
        raise OSError("push_to_hub needs the Hub, but HF_HUB_OFFLINE=1 is set: unset it, or save with "
                      "fs_mllm.save_pretrained(model, folder) and upload the folder later")
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="fs_mllm_push_") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        config = FSConfig.from_dict(read_saved_patch(Path(tmp) / FS_CONFIG_NAME).fs_config)
        message = commit_message or f"Upload model patched with fs_mllm {__version__} (sigma={config.sigma:g})"
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
