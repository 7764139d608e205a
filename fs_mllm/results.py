"""Append-only JSONL results store, shared by every resumable run (``fs-mllm eval``, ``fs-mllm attack``, the
defense table, ``fs-mllm certify --answers``), each through :class:`ResultsFolder`.

Why it is built this way: a long run must survive a kill and be resumed by rerunning the same
command. Every result is one JSON line with a ``key``, written with flush + fsync the moment it exists;
a rerun reads the rows already written and skips their keys; a torn last line (the kill came mid-write)
is cut off before appending, so the next row never glues onto it; nothing written is ever rewritten.
One writer per file: a second run on the same file is refused (``fcntl.flock`` on ``<file>.lock``,
non-blocking) instead of both appending the same keys. Under ``accelerate`` each rank writes its own
file, so each rank locks its own.

The eval runner's folder layout lives here too (:func:`shard_path`, :func:`read_results`): the runner,
the settings check and the summary all read the same shard files. The ``settings.json`` check of the
resumable result folders lives here as well (:func:`claim_settings`, :func:`check_settings`, both run by
:class:`ResultsFolder`; booster training checkpoints keep their config in their own
state file but name what differs with the same :func:`describe_changes`): a rerun under other settings
into a folder that holds results is refused, because results computed under different settings would
be mixed silently.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Collection, Iterator, Mapping, Optional, Sequence

__all__ = ["ResultsFolder", "ResultsFolderError", "ResultsBusyError", "SettingsMismatchError", "ResultsLock", "ResultWriter",
           "repair_tail", "read_rows", "finite_or_none", "durable_replace", "SETTINGS_FILE", "claim_settings", "describe_changes",
           "check_settings", "SHARD_GLOB", "shard_path", "shard_files", "rows_by_key", "result_key", "read_results"]

SHARD_GLOB = "results.rank*.jsonl"  # every file :func:`shard_path` names
SETTINGS_FILE = "settings.json"


class ResultsFolderError(RuntimeError):
    """The output folder cannot be used as asked (another writer, other settings); nothing was written."""


class ResultsBusyError(ResultsFolderError):
    """Another run holds the lock of this results file."""


class SettingsMismatchError(ResultsFolderError, ValueError):
    """The folder holds results computed under other settings; resuming would mix them."""


class ResultsLock:
    """Exclusive, non-blocking lock of one results file, held until :meth:`release` (or process exit).

    The lock file stays in the folder: removing it while another process waits on it would let two
    writers in.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle: Optional[IO[str]] = open(self.path.parent / (self.path.name + ".lock"), "a", encoding="utf-8")
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            self._handle = None
            raise ResultsBusyError(f"another run is writing to {self.path.parent} ({self.path.name}); wait for it "
                                   "to finish, or use another output folder") from None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None


def repair_tail(path: str | os.PathLike) -> None:
    """Cut a partial last line (a crash mid-write) so the next append starts on a fresh line.

    Only bytes after the last newline are removed: they never formed a complete record, so no
    written result is lost or changed.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    size = path.stat().st_size
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        chunk = 1 << 16
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of one results file (each a dict with a ``key``); a last line without its newline is an interrupted
    write (a row and its newline go in one write) and is skipped, as :func:`repair_tail` cuts it, even where it
    happens to parse; a bad line elsewhere is corruption and raises ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines.pop()  # b"" after the last newline, or the unterminated tail of an interrupted write
    for i, raw in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError("not a result row")
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: line {i + 1} is not a valid result row; the file is corrupt "
                             "(only a truncated last line is tolerated)") from None
        rows.append(row)
    return rows


def finite_or_none(value: Any) -> Any:
    """NaN/inf as None: result lines are strict JSON (``allow_nan=False``), readable by any JSON parser."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultWriter:
    """Append-only JSONL writer of one locked results file; a row counts as done once flushed and fsynced.

    Takes the file's lock (or the ``lock`` already taken, e.g. before checking the folder's settings),
    repairs a torn tail, and releases the lock on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, lock: Optional[ResultsLock] = None) -> None:
        self.path = Path(path)
        self._lock = lock or ResultsLock(self.path)
        try:
            repair_tail(self.path)
            self._f = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._lock.release()
            raise

    def write(self, row: Mapping[str, Any]) -> None:
        if "key" not in row:
            raise ValueError("a result row needs a 'key' (what a rerun skips)")
        line = json.dumps(row, sort_keys=True, allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            self._lock.release()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ResultsFolder:
    """A resumable run's folder: ``settings.json`` (what its results measured), append-only rows files (each
    row with its ``key``, written durably the moment it exists) and one writer per rows file (its lock).

    The one claiming and resume rule of the resumable runs (``fs-mllm eval``, ``fs-mllm attack``, the defense
    table's checkpoints, ``fs-mllm certify --answers``): a folder that holds no results is claimed by the run (its ``settings.json``
    written over: a first run that stopped before any result computed nothing to mix in); one that holds
    results resumes only under the same settings (keys in ``may_change`` aside; ``upgrade`` reads a
    settings.json of an older version), else :class:`SettingsMismatchError` names each differing field.
    ``done`` maps each key already written to its row as a resume reads it back, so a rerun computes only what
    is missing. With ``settings=None`` there is no settings.json: each row's key names the settings it was made
    with (``fs-mllm attack``: a folder holds several runs, a rerun of one skips its own rows).

    Several processes (``accelerate launch``) share a folder as shards (``shards=True``): each writes its own
    ``rows_file`` and reads every shard file (:func:`shard_files`, in rank order, the first row of a key wins),
    before the barrier, so no process's writes can reach another's read; only the one that
    ``claims`` writes settings.json, and ``synchronize`` (a barrier) runs after the claim so that every process
    checks the same file.

    Raises:
        ResultsBusyError: another run holds the rows file.
        ResultsFolderError: a rows file is corrupt (not only a torn last line).
        SettingsMismatchError: the folder holds results of other settings.
    """

    def __init__(self, folder: str | os.PathLike, settings: Optional[Mapping[str, Any]], *, rows_file: str = "rows.jsonl",
                 may_change: Collection[str] = (), upgrade: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
                 label: str = "output_dir", fix: str = "use a new output folder or restore the original settings",
                 other_results: bool = False, shards: bool = False, claims: bool = True,
                 synchronize: Callable[[], None] = lambda: None, key: Callable[..., tuple] = lambda *parts: parts) -> None:
        self.folder = Path(folder)
        self._key = key
        rows_path = self.folder / rows_file
        lock = ResultsLock(rows_path)  # first: the settings.json of a folder another run writes to is never replaced
        try:
            try:
                self.done = rows_by_key(shard_files(self.folder) if shards else [rows_path], key)
            except ValueError as error:
                raise ResultsFolderError(f"{error}; delete the folder {self.folder} to start the run again") from None
            if settings is not None:
                if claims:
                    claim_settings(self.folder, settings, holds_results=bool(self.done) or other_results)
                synchronize()
                check_settings(self.folder, settings, may_change=may_change, upgrade=upgrade, label=label, fix=fix)
            self._writer = ResultWriter(rows_path, lock)
        except BaseException:
            lock.release()
            raise

    def put(self, key: Sequence[Any], record: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``record`` under ``key`` (flushed and fsynced: the key counts as done once this returns) and return
        the row as a resumed run reads it back (strict JSON: NaN and inf as None, keys sorted)."""
        if "key" in record and list(record["key"]) != list(key):
            raise ValueError(f"put: the record's own key {record['key']!r} is not the key it is stored under, {list(key)!r}")
        row = {**{k: finite_or_none(v) for k, v in record.items()}, "key": list(key)}
        self._writer.write(row)
        self.done[self._key(*key)] = json.loads(json.dumps(row, sort_keys=True))
        return self.done[self._key(*key)]

    def close(self) -> None:
        """Release the folder (its lock); the rows written stay."""
        self._writer.close()

    def __enter__(self) -> "ResultsFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def durable_replace(temporary: Path, path: Path) -> None:
    """Rename a fully written file into place, flushed to disk first, so a crash leaves the old file or the new one."""
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# the settings.json of a resumable folder

def claim_settings(folder: str | os.PathLike, settings: Mapping[str, Any], holds_results: bool) -> None:
    """Write ``settings.json`` for a folder that holds no results yet, even over an existing one: a first run
    that failed before any result (e.g. a wrong model) computed nothing that could be mixed in."""
    if not holds_results:
        path = Path(folder) / SETTINGS_FILE
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
        durable_replace(temporary, path)


_MISSING = object()  # a key one side does not have


def _changed_fields(saved: Any, current: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any]]:
    """(key path, stored value, current value) of every leaf that differs, e.g. (("settings", "fs", "sigma"), 0.25, 0.5)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changes = []
        for key in sorted(set(saved) | set(current)):
            changes += _changed_fields(saved.get(key, _MISSING), current.get(key, _MISSING), (*path, key))
        return changes
    if {id(saved), id(current)} <= {id(None), id(_MISSING)}:
        return []  # a field added since, left at None (its old behaviour), does not change what was measured
    return [] if saved == current else [(path, saved, current)]


def _show(value: Any, other: Any, width: int = 60) -> str:
    """``value`` for an error message; a long string as the window around its first difference from ``other``
    (two processor configurations differ deep inside their JSON)."""
    if value is _MISSING:
        return "(missing)"
    if isinstance(value, str) and len(value) > width:
        first = next((i for i, (a, b) in enumerate(zip(value, other if isinstance(other, str) else "")) if a != b),
                     min(len(value), len(other)) if isinstance(other, str) else 0)
        start = max(0, first - width // 3)
        return f"{'...' if start else ''}{value[start:start + width]!r}{'...' if start + width < len(value) else ''}"
    return repr(value)


def describe_changes(saved: Any, current: Any, may_change: Collection[str] = ()) -> list[str]:
    """One ``field.path: stored A, now B`` per differing leaf of two settings (compared as JSON, tuples as
    lists), top-level keys in ``may_change`` aside: what every refused resume names."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return [f"{'.'.join(map(str, keys))}: stored {_show(old, new)}, now {_show(new, old)}"
            for keys, old, new in _changed_fields(saved, current) if not keys or keys[0] not in may_change]


def check_settings(folder: str | os.PathLike, settings: Mapping[str, Any], may_change: Collection[str] = (),
                   upgrade: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None, label: str = "output_dir",
                   fix: str = "use a new output folder or restore the original settings") -> None:
    """Raise :class:`SettingsMismatchError`, naming each differing field, unless the folder's ``settings.json``
    matches ``settings``. ``may_change`` names top-level keys that only select which results are computed;
    ``upgrade`` converts a file written by an older version. Call after :func:`claim_settings`, so a missing
    file means results whose settings are unknown."""
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    unusable = f"use another {label} folder, or delete this one to start again"
    if not path.exists():
        raise SettingsMismatchError(f"{label} {str(folder)!r} holds results but no {SETTINGS_FILE}, so what they "
                                    f"measured is unknown; {unusable}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsMismatchError(f"{label} {str(folder)!r}: cannot read {SETTINGS_FILE} ({exc}); {unusable}") from None
    changed = describe_changes(upgrade(saved) if upgrade is not None else saved, settings, may_change)
    if changed:
        detail = "; ".join(changed)
        raise SettingsMismatchError(f"{label} {str(folder)!r} holds results of a run with other settings ({detail}). "
                                    "Refusing to resume into it, since results computed under different settings "
                                    f"would be mixed; {fix}")


# the eval runner's folder: one shard file per process (accelerate rank), keys (example id, variant, budget)

@contextmanager
def folder_kept_only_with_rows(folder: str | os.PathLike, rows_file: str = "*.jsonl") -> Iterator[None]:
    """Around a run that may create ``folder``: when the run fails before writing a row, a folder it
    created is removed, so a typo (a bad split, a missing model) leaves nothing to clean up or resume."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()  # atomic: of two runs starting at once on a new folder, one only made it
        created = True
    except FileExistsError:
        created = False
    try:
        yield
    except BaseException as error:
        refused = isinstance(error, ResultsFolderError)  # another run's folder, or one in use: never ours to remove
        if created and not refused and folder.is_dir() and not any(p.stat().st_size for p in folder.glob(rows_file)):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def shard_path(output_dir: str | os.PathLike, rank: int) -> Path:
    """Results file of process ``rank`` (each process appends only to its own file)."""
    return Path(output_dir) / f"results.rank{int(rank)}.jsonl"


def result_key(example_id: str, variant: str, budget: float) -> tuple[str, str, float]:
    """The key a rerun skips; budget 0.0 is the clean row."""
    return (str(example_id), str(variant), float(budget))


def shard_files(output_dir: str | os.PathLike) -> list[Path]:
    """The shard files of an output folder (``results.rank<N>.jsonl``), in rank order."""
    return sorted(Path(output_dir).glob(SHARD_GLOB), key=lambda p: int(p.stem.split("rank")[-1]))


def rows_by_key(paths: Sequence[str | os.PathLike], key: Callable[..., tuple]) -> dict[tuple, dict[str, Any]]:
    """The rows of ``paths`` keyed by ``key(*row["key"])``, each key once: where two files hold the same key (two
    processes raced on one example), the first row read wins, files in the order given, so the outcome is
    deterministic."""
    out: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        for row in read_rows(path):
            out.setdefault(key(*row["key"]), row)
    return out


def read_results(output_dir: str | os.PathLike) -> dict[tuple[str, str, float], dict[str, Any]]:
    """All result rows of an output folder, keyed by (example id, variant, budget), each key once (the first of
    the shards in rank order, :func:`rows_by_key`; e.g. a rerun with another process count while the old run
    was still alive)."""
    return rows_by_key(shard_files(output_dir), result_key)


def write_report(out_dir: Path, title: str, markdown_table: str, extra: Sequence[str] = ()) -> Path:
    """A command's ``report.md``: its title, its table, then its notes (the figures' provenance and readings)."""
    path = out_dir / "report.md"
    path.write_text("\n\n".join([f"# {title}", markdown_table, *extra]) + "\n", encoding="utf-8")
    return path
