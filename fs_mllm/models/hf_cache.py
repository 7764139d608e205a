"""The HF cache layout, written locally: a folder placed as a repo snapshot that ``huggingface_hub`` and
``transformers`` resolve offline (the embedded fs-mini-llava lives there, :func:`fs_mllm.models.mini_llava.mini_llava_repo`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..hub.format import COMMIT, PathLike, check_repo_id


def sha256(path: Path) -> str:
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
    check_repo_id(repo_id, "repo_id")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digests = {p: sha256(p) for p in files}
    if commit is None:
        listing = "\n".join(f"{p.relative_to(source).as_posix()} {digests[p]}" for p in files)
        commit = hashlib.sha1(listing.encode()).hexdigest()
    if not COMMIT.match(commit):
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
