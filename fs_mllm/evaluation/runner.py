"""Resumable, shardable robustness evaluation of a multimodal LLM: base vs FS vs FS+GSB, clean and attacked.

Why it is built this way:

* **Resumable.** Every (example id, variant, attack budget) result is one JSON line, written with
  flush + fsync the moment it exists. A killed run is rerun with the same command: existing lines are
  read, done keys are skipped, a truncated last line (the crash happened mid-write) is cut off before
  appending, and nothing already written is rewritten (the store is :mod:`fs_mllm.evaluation.results`,
  which also refuses a second run writing to the same file at once). The run's settings live in
  ``settings.json`` beside the results; a rerun with different settings is refused once the folder
  holds a row, because mixing rows computed under different settings would silently corrupt the summary.
* **Shardable.** Under ``accelerate launch --num_processes N`` each process takes every N-th example and
  appends only to its own ``results.rank<r>.jsonl`` (no two writers share a file). After
  ``wait_for_everyone`` the main process reads all shard files, keeps each key exactly once and writes
  the summary, so the result does not depend on N.
* **Budget 0 is the clean row.** Its key has budget ``0.0``; attacked rows carry their eps. Attack rows
  reuse the clean answer/features of the same variant (recomputed when the clean row came from an
  earlier run; generation is greedy and the smoothing noise is seeded, so it is the same).

Attacks are :func:`fs_mllm.attacks.attack` (PGD l2/linf, objectives feature / untargeted / targeted,
adaptive against the smoothed model through EOT); FCS is measured here the same way for every variant:
the features the decoder receives (smoothed with the patch's own seed on FS variants), clean vs attacked.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "DEFAULT_MODEL",
    "VARIANTS",
    "NORMS",
    "OBJECTIVES",
    "SETTINGS_FILE",
    "EvalSettings",
    "SettingsMismatchError",
    "load_model",
    "build_prompt_for",
    "read_results",
    "run_eval",
    "summarize",
    "shard_path",
    "fs_attack",
    "objective_for",
    "add_common_arguments",
    "settings_from_args",
    "main",
]

from fs_mllm.arguments import (  # noqa: E402
    add_fs_config_arguments, check_float, check_int, fraction_pair, non_negative_int, positive_float, positive_int, probability,
)
from fs_mllm.evaluation.results import (  # noqa: E402
    ResultsFolderError, ResultsLock, ResultWriter, finite_or_none, read_rows,
)
from fs_mllm.config import FSConfig  # noqa: E402
from fs_mllm.models.loading import DEFAULT_MODEL, load_model  # noqa: E402  (one loader for all entry points)

from fs_mllm.attacks import NORMS, OBJECTIVES, PROTOCOLS  # noqa: E402  (one definition of each)
from fs_mllm.defense import VARIANTS, apply_variant  # noqa: E402
TASKS = ("vqa", "caption")
SETTINGS_FILE = "settings.json"
BARRIER_TIMEOUT_HOURS = 48
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CURVE_PNG = "certified_curve.png"
BUDGET_PNG = "accuracy_vs_budget.png"
# Settings that may change between a run and its resume: they select *which* keys are computed, never
# what a key's row contains (a larger --limit or an extra budget just adds rows).
_EXTENSIBLE = ("limit", "attack_eps")


class SettingsMismatchError(ResultsFolderError, ValueError):
    """The output folder holds results computed under other settings; resuming would mix them."""


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """Everything that decides the content of a result row (stored as ``settings.json``).

    task: "vqa" or "caption". model: "fs-mini-llava" (the embedded offline LLaVA) or a model id/folder
    for ``AutoModelForImageTextToText``. dataset/split: for :func:`load_eval_dataset`. variants: any of
    "base", "fs", "fs+gsb" (the last needs ``booster``, a GSB folder). sigma/n_samples/seed: the FS patch.
    attack_eps: attack budgets (> 0; empty = clean only) in [0,1] pixel space at processor resolution,
    with ``attack_norm``, ``attack_steps``, ``attack_step_size`` (None = 2.5 * eps / steps), ``objective``,
    ``target`` (targeted only) and ``eot_samples`` (noisy forwards per gradient on FS variants).
    protocol: "adaptive" (through each variant's own smoothed path) or "transfer" (the paper's protocol:
    crafted on the undefended model with the same seed for every variant, so every variant sees the same
    images); objective "feature_target" pulls the features towards the next example's image, and rows
    then record the variant's answer for that image and whether the attacked answer became it.
    crop_scale: M-Attack's random local crops (lo, hi area fraction) or None. certify_n > 0 certifies every FS variant's clean image with that many
    noise samples at level ``certify_alpha``. limit: first N examples only.
    """

    task: str = "vqa"
    model: str = DEFAULT_MODEL
    dataset: str = "fs-offline-eval"
    split: Optional[str] = "validation"
    variants: tuple = ("base", "fs")
    sigma: float = FSConfig.sigma  # FSConfig holds the defaults
    n_samples: int = FSConfig.n_samples
    seed: int = FSConfig.seed
    booster: Optional[str] = None
    attack_norm: str = "l2"
    attack_eps: tuple = ()
    attack_steps: int = 10
    attack_step_size: Optional[float] = None
    objective: str = "feature"
    target: Optional[str] = None
    protocol: str = "adaptive"
    crop_scale: Optional[tuple] = None
    eot_samples: int = 1
    certify_n: int = 0
    certify_alpha: float = 0.001
    max_new_tokens: int = 10
    caption_prompt: str = "Describe the image in one sentence."
    limit: Optional[int] = None
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("model", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty str, got {getattr(self, name)!r}")
        if isinstance(self.variants, str):
            self.variants = tuple(v.strip() for v in self.variants.split(",") if v.strip())
        self.variants = tuple(self.variants)
        if not self.variants:
            raise ValueError(f"variants must name at least one of {VARIANTS}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"variants: unknown variant {v!r}; choose from {VARIANTS}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must not repeat a variant, got {self.variants}")
        if "fs+gsb" in self.variants and not self.booster:
            if self.model != DEFAULT_MODEL:
                raise ValueError("variants contains 'fs+gsb' but booster is not set (a GaussianSmoothnessBooster folder)")
            from fs_mllm.models.mini_llava import BOOSTER_DIR

            self.booster = str(BOOSTER_DIR)  # the shipped booster of the embedded model
        # a local folder is stored as an absolute path, so a resume from another cwd compares equal
        if os.path.isdir(self.model):
            self.model = os.path.abspath(self.model)
        if os.path.isdir(self.dataset):
            self.dataset = os.path.abspath(self.dataset)
        if self.booster is not None:
            self.booster = os.path.abspath(os.fspath(self.booster))
        self.sigma = check_float(self.sigma, "sigma")
        self.n_samples = check_int(self.n_samples, "n_samples", 2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.attack_norm not in NORMS:
            raise ValueError(f"attack_norm must be one of {NORMS}, got {self.attack_norm!r}")
        if isinstance(self.attack_eps, (int, float)):
            self.attack_eps = (self.attack_eps,)
        eps = tuple(check_float(e, "attack_eps") for e in self.attack_eps)
        if len(set(eps)) != len(eps):
            raise ValueError(f"attack_eps must not repeat a budget, got {list(eps)}")
        self.attack_eps = tuple(sorted(eps))
        self.attack_steps = check_int(self.attack_steps, "attack_steps")
        if self.attack_step_size is not None:
            self.attack_step_size = check_float(self.attack_step_size, "attack_step_size")
        self.eot_samples = check_int(self.eot_samples, "eot_samples")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if self.attack_eps:  # every budget through the attack's own range checks, before any model work
            from fs_mllm.attacks import AttackConfig

            for eps in self.attack_eps:
                AttackConfig(norm=self.attack_norm, eps=eps, steps=self.attack_steps, objective=self.objective,
                             target_text=self.target, protocol=self.protocol, crop_scale=self.crop_scale)
        if self.objective == "targeted" and self.attack_eps and not (self.target and self.target.strip()):
            raise ValueError("objective='targeted' needs target (the string the attack makes the model say)")
        if isinstance(self.certify_n, bool) or not isinstance(self.certify_n, int) or self.certify_n < 0 or self.certify_n == 1:
            raise ValueError(f"certify_n must be 0 (no certification) or an integer >= 2, got {self.certify_n!r}")
        if not 0.0 < float(self.certify_alpha) < 1.0:
            raise ValueError(f"certify_alpha must lie in (0, 1), got {self.certify_alpha!r}")
        self.certify_alpha = float(self.certify_alpha)
        self.max_new_tokens = check_int(self.max_new_tokens, "max_new_tokens")
        if self.limit is not None:
            self.limit = check_int(self.limit, "limit")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {self.dtype!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = list(self.variants)
        data["attack_eps"] = list(self.attack_eps)
        data["crop_scale"] = None if self.crop_scale is None else list(self.crop_scale)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EvalSettings fields {unknown}")
        return cls(**dict(data))

    @property
    def budgets(self) -> tuple[float, ...]:
        """0.0 (clean) followed by the attack budgets."""
        return (0.0,) + tuple(self.attack_eps)


def _comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _EXTENSIBLE}


def _has_rows(output_dir: Path) -> bool:
    return any(read_rows(p) for p in output_dir.glob("results.rank*.jsonl"))


def _check_or_write_settings(output_dir: Path, stored_settings: dict[str, Any], is_main: bool) -> None:
    """Write ``settings.json`` for a fresh folder. A folder without result rows is fresh even if a
    ``settings.json`` is there: its first run failed before any row (e.g. a wrong --model), and nothing
    computed under those settings could be mixed in."""
    path = output_dir / SETTINGS_FILE
    if is_main and not _has_rows(output_dir):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stored_settings, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def _verify_settings(output_dir: Path, stored_settings: dict[str, Any]) -> None:
    path = output_dir / SETTINGS_FILE
    if not path.exists() and _has_rows(output_dir):
        raise SettingsMismatchError(f"output_dir {str(output_dir)!r} holds results but no {SETTINGS_FILE}, so its "
                                    "settings cannot be checked; use a new output folder")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsMismatchError(f"output_dir {str(output_dir)!r}: cannot read {SETTINGS_FILE} ({exc}); "
                                    "use a new output folder") from None
    a, b = _comparable(old), _comparable(stored_settings)
    diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diffs:
        detail = "; ".join(f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in diffs)
        raise SettingsMismatchError(
            f"output_dir {str(output_dir)!r} holds results of a run with different settings ({detail}). "
            "Refusing to resume into it, since rows computed under different settings would be mixed; "
            "use a new output folder (--output-dir) or restore the original settings."
        )


# ---------------------------------------------------------------------------------------------
# results files
# ---------------------------------------------------------------------------------------------

def shard_path(output_dir: str | os.PathLike, rank: int) -> Path:
    """Results file of process ``rank`` (each process appends only to its own file)."""
    return Path(output_dir) / f"results.rank{int(rank)}.jsonl"


def _key(example_id: str, variant: str, budget: float) -> tuple[str, str, float]:
    return (str(example_id), str(variant), float(budget))


def read_results(output_dir: str | os.PathLike) -> dict[tuple[str, str, float], dict[str, Any]]:
    """All result rows of an output folder, keyed by (example id, variant, budget), each key once.

    If two shard files hold the same key (two processes raced on one example, e.g. a rerun with
    another process count while the old run was still alive), the first row read wins, files in rank
    order, so the outcome is deterministic.
    """
    out: dict[tuple[str, str, float], dict[str, Any]] = {}
    files = sorted(Path(output_dir).glob("results.rank*.jsonl"), key=lambda p: int(p.stem.split("rank")[-1]))
    for path in files:
        for row in read_rows(path):
            key = _key(*row["key"])
            if key not in out:
                out[key] = row
    return out


# ---------------------------------------------------------------------------------------------
# model, prompts, features
# ---------------------------------------------------------------------------------------------

def build_prompt_for(processor: Any, text: str, model_id: str = "") -> str:
    """The model's prompt for one image + one text: fs-mini-llava's trained format, else the chat template,
    else ``<image>\\n{text}`` (what LLaVA-style processors expand)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty str (question or caption instruction)")
    if model_id == DEFAULT_MODEL:
        from fs_mllm.models.mini_llava import build_prompt

        return build_prompt(text)
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"{token}\n{text}"


def _mean_std(processor: Any) -> tuple[list[float], list[float]]:
    ip = getattr(processor, "image_processor", processor)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None:
        raise ValueError("processor has no image_processor.image_mean/image_std; cannot map pixels to [0,1]")
    return list(mean), list(std)


class _Context:
    """One example prepared for one model: processor inputs, [0,1] pixels and the family kwargs."""

    def __init__(self, model: Any, processor: Any, image: Any, prompt: str) -> None:
        from fs_mllm.adapters import get_adapter

        self.model, self.processor, self.image, self.prompt = model, processor, image, prompt
        self.adapter = get_adapter(model)
        self.mean, self.std = _mean_std(processor)
        self.inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
        self.device = next(p.device for p in model.parameters())
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in self.inputs.items()}
        self.extra = {k: self.inputs[k] for k in self.adapter.per_image_kwargs if self.inputs.get(k) is not None}
        pv = self.inputs["pixel_values"].float()
        self.pixels01 = self.adapter.model_inputs_to_pixels(model, pv, self.mean, self.std, **self.extra)
        if isinstance(self.pixels01, list):
            raise ValueError("images of different shapes within one example are not supported by the runner")
        self.pixels01 = self.pixels01.clamp(0, 1)
        self.target: Optional["_Context"] = None  # the target image's context (feature_target attacks)

    def model_inputs(self, pixels01: Optional[torch.Tensor]) -> dict[str, Any]:
        if pixels01 is None:
            return dict(self.inputs)
        new = self.adapter.pixels_to_model_inputs(self.model, pixels01.float(), self.mean, self.std, **self.extra)
        new["pixel_values"] = new["pixel_values"].to(self.dtype)
        return {**self.inputs, **new}

    def features(self, pixels01: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image features that feed the decoder (smoothed when the model is patched): (1, T, D)."""
        inputs = self.model_inputs(pixels01)
        owner = self.adapter.feature_owner(self.model)
        fn = getattr(owner, self.adapter.feature_function)
        params = inspect.signature(fn).parameters
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in inputs.items()
                  if k not in ("pixel_values", "input_ids", "attention_mask") and (k in params or accepts_any)
                  and k in self.adapter.per_image_kwargs + ("image_grid_thw",)}
        out = fn(pixel_values=inputs["pixel_values"], return_dict=True, **kwargs)
        return self.adapter.extract_features(out, 1).float()

    def generate(self, pixels01: Optional[torch.Tensor], max_new_tokens: int) -> str:
        inputs = self.model_inputs(pixels01)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def _flat_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).squeeze(0)


# ---------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------

AttackFn = Callable[..., torch.Tensor]


def fs_attack(ctx: "_Context", eps: float, settings: EvalSettings, clean_answer: str, seed: int) -> torch.Tensor:
    """Adversarial [0,1] pixels from :func:`fs_mllm.attacks.attack` (PGD, adaptive EOT on a patched model).

    The untargeted objective pushes the variant's own clean answer away (under the transfer protocol the
    undefended model's, so every variant gets the same image); an empty clean answer has no loss to push,
    so that example falls back to the feature objective (recorded as ``objective_used``).
    ``feature_target`` pulls towards ``ctx.target`` (the next example's image).
    """
    from fs_mllm.attacks import AttackConfig, attack

    objective = objective_for(settings, clean_answer)
    config = AttackConfig(norm=settings.attack_norm, eps=eps, steps=settings.attack_steps,
                          step_size=settings.attack_step_size, objective=objective, protocol=settings.protocol,
                          crop_scale=settings.crop_scale,
                          target_text=settings.target if objective == "targeted" else None,
                          eot_samples=settings.eot_samples, seed=seed)
    prompts = None if objective in ("feature", "feature_target") else [ctx.prompt]
    answers = [clean_answer] if objective == "untargeted" and settings.protocol == "adaptive" else None
    target = ctx.target.pixels01 if objective == "feature_target" else None
    result = attack(ctx.model, ctx.processor, ctx.pixels01, prompts, config, answers=answers,
                    image_mean=ctx.mean, image_std=ctx.std, target_images=target, **ctx.extra)
    return result.adv_images


def objective_for(settings: EvalSettings, clean_answer: str) -> str:
    """The objective actually used for one example (see :func:`fs_attack`)."""
    if settings.objective == "untargeted" and not clean_answer.strip():
        return "feature"
    return settings.objective


def _resolve_attack(attack_fn: Optional[AttackFn]) -> tuple[AttackFn, str]:
    """The attack used and its name (stored in settings.json: results of two attacks must not mix)."""
    if attack_fn is not None:
        return attack_fn, f"{getattr(attack_fn, '__module__', '?')}.{getattr(attack_fn, '__qualname__', 'custom')}"
    return fs_attack, "fs_mllm.attacks.attack"


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _example_fields(task: str, row: Mapping[str, Any], settings: EvalSettings) -> tuple[str, str, list[str]]:
    if task == "vqa":
        return str(row["question_id"]), row["question"], list(row["answers"])
    return str(row["image_id"]), settings.caption_prompt, list(row["captions"])


def _load_booster(path: str) -> Any:
    from fs_mllm.gsb import GaussianSmoothnessBooster

    return GaussianSmoothnessBooster.from_pretrained(path).eval()


def _set_variant(model: Any, processor: Any, variant: str, settings: EvalSettings, booster: Any) -> None:
    apply_variant(model, variant, settings.sigma, settings.n_samples, processor, booster, settings.seed)


def _distributed() -> Any:
    """accelerate's process state; the barrier timeout is long because at a resume one rank may have
    finished its shard earlier and waits at the final barrier for the others' remaining work (a crashed
    rank still ends the run: the launcher stops the group)."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=BARRIER_TIMEOUT_HOURS))


def run_eval(
    settings: EvalSettings,
    output_dir: str | os.PathLike,
    *,
    model: Any = None,
    processor: Any = None,
    dataset: Any = None,
    attack_fn: Optional[AttackFn] = None,
    on_result: Optional[Callable[[dict[str, Any]], None]] = None,
    progress: bool = True,
) -> Optional[dict[str, Any]]:
    """Run (or resume) an evaluation into ``output_dir``; returns the summary on the main process.

    ``model``/``processor``/``dataset`` may be passed in memory (else loaded from ``settings``);
    ``attack_fn(ctx, eps, settings, clean_answer, seed) -> adv pixels01`` replaces :func:`fs_attack`;
    ``on_result(row)`` is called after each row is durably written (progress hooks, tests).
    Works unchanged under ``accelerate launch`` (see module doc).
    """
    if not isinstance(settings, EvalSettings):
        raise ValueError(f"settings must be an EvalSettings, got {type(settings).__name__}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} exists and is not a folder")
    dist = _distributed()
    rank, world = dist.process_index, dist.num_processes
    out.mkdir(parents=True, exist_ok=True)
    attack, attack_name = _resolve_attack(attack_fn)
    stored = {**settings.to_dict(), "attack_impl": attack_name}
    # the lock comes first: settings.json of a folder another run is writing to is never replaced
    lock = ResultsLock(shard_path(out, rank))
    try:
        _check_or_write_settings(out, stored, dist.is_main_process)
        dist.wait_for_everyone()
        _verify_settings(out, stored)  # every process raises on a mismatch, so none waits forever below
        writer = ResultWriter(shard_path(out, rank), lock)  # repairs this rank's torn tail before anyone reads
    except BaseException:
        lock.release()
        raise
    dist.wait_for_everyone()
    try:
        done = read_results(out)

        if dataset is None:
            from fs_mllm.evaluation import load_eval_dataset

            dataset = load_eval_dataset(settings.dataset, task=settings.task, split=settings.split)
        n_total = len(dataset) if settings.limit is None else min(settings.limit, len(dataset))
        ids = [str(v) for v in dataset["question_id" if settings.task == "vqa" else "image_id"][:n_total]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {settings.dataset!r}: example ids are not unique; results are keyed by id")
        my_indices = list(range(rank, n_total, world))
        todo = [i for i in my_indices
                if any(_key(ids[i], v, b) not in done for v in settings.variants for b in settings.budgets)]

        if todo:
            if model is None:
                device = dist.device if torch.cuda.is_available() else "cpu"
                model, processor = load_model(settings.model, device=device, dtype=settings.dtype)
            elif processor is None:
                raise ValueError("processor is required when model is passed in memory")
            booster = _load_booster(settings.booster) if "fs+gsb" in settings.variants else None
            _run_shard(settings, model, processor, dataset, todo, ids, done, writer, attack,
                       on_result, progress and dist.is_main_process, booster, rank, world)
    finally:
        writer.close()
        if model is not None:
            from fs_mllm.patching import unpatch_model

            unpatch_model(model)
    dist.wait_for_everyone()
    if not dist.is_main_process:
        return None
    summary = summarize(out, settings, dataset_ids=ids)
    return summary


def _run_shard(settings: EvalSettings, model: Any, processor: Any, dataset: Any, todo: list[int], ids: list[str],
               done: dict, writer: ResultWriter, attack: AttackFn, on_result: Optional[Callable],
               show_progress: bool, booster: Any, rank: int, world: int) -> None:
    from tqdm.auto import tqdm

    from fs_mllm.evaluation.vqa import vqa_score

    for variant in settings.variants:
        _set_variant(model, processor, variant, settings, booster)
        bar = tqdm(todo, desc=f"{settings.task} [{variant}] rank {rank}/{world}", disable=not show_progress)
        for index in bar:
            ex = dataset[index]
            example_id, text, refs = _example_fields(settings.task, ex, settings)
            keys = {b: _key(example_id, variant, b) for b in settings.budgets}
            if all(k in done for k in keys.values()):
                continue
            prompt = build_prompt_for(processor, text, settings.model)
            ctx = _Context(model, processor, ex["image"].convert("RGB"), prompt)
            target_answer = None
            if settings.objective == "feature_target" and settings.attack_eps:
                target_index = (index + 1) % len(dataset)  # another example's image: the AttackVLM target
                ctx.target = _Context(model, processor, dataset[target_index]["image"].convert("RGB"), prompt)
            base_row = {"index": index, "example_id": example_id, "variant": variant, "task": settings.task}
            if settings.task == "vqa":
                base_row["answers"] = refs
            else:
                base_row["references"] = refs

            clean_key = keys[0.0]
            if clean_key in done:
                clean_answer = done[clean_key]["prediction"]
            else:
                clean_answer = ctx.generate(None, settings.max_new_tokens)
                row = {**base_row, "key": list(clean_key), "budget": 0.0, "norm": None, "prediction": clean_answer,
                       "clean_prediction": clean_answer, "fcs": None, "changed": None}
                if settings.task == "vqa":
                    row["score"] = vqa_score(clean_answer, refs)
                if settings.certify_n and variant != "base":
                    from fs_mllm.certify import certify_model

                    cert = certify_model(model, ctx.pixels01, n=settings.certify_n, alpha=settings.certify_alpha,
                                         **ctx.extra)[0]
                    row["s_low"] = finite_or_none(float(cert.score_lower))
                    row["s_mean"] = finite_or_none(float(cert.score_mean))
                    row["fcsb_half_sigma"] = finite_or_none(float(cert.fcsb(settings.sigma / 2)))
                writer.write(row)
                done[clean_key] = row
                if on_result is not None:
                    on_result(row)

            clean_features = None
            for budget in settings.attack_eps:
                key = keys[budget]
                if key in done:
                    continue
                if clean_features is None:
                    with torch.no_grad():
                        clean_features = ctx.features(None)
                if ctx.target is not None and target_answer is None:
                    target_answer = ctx.target.generate(None, settings.max_new_tokens)
                seed = (settings.seed + 7919 * index + int(round(budget * 1e6))) % (2 ** 31)
                adv = attack(ctx, budget, settings, clean_answer, seed)
                if not isinstance(adv, torch.Tensor) or adv.shape != ctx.pixels01.shape:
                    raise ValueError(f"attack_fn must return adversarial [0,1] pixels of shape {tuple(ctx.pixels01.shape)}")
                with torch.no_grad():
                    adv_features = ctx.features(adv)
                answer = ctx.generate(adv, settings.max_new_tokens)
                from fs_mllm.evaluation.robustness import normalize_text, targeted_success

                dist_l2 = float((adv - ctx.pixels01).flatten().norm())
                dist_linf = float((adv - ctx.pixels01).abs().max())
                row = {**base_row, "key": list(key), "budget": budget, "norm": settings.attack_norm,
                       "prediction": answer, "clean_prediction": clean_answer,
                       "fcs": finite_or_none(float(_flat_cos(clean_features, adv_features))),
                       "changed": normalize_text(answer) != normalize_text(clean_answer),
                       "perturbation_l2": dist_l2, "perturbation_linf": dist_linf,
                       "protocol": settings.protocol, "objective_used": objective_for(settings, clean_answer)}
                if settings.objective == "targeted":
                    row["target_hit"] = targeted_success(answer, settings.target)
                elif target_answer is not None:
                    # the answer became the variant's answer for the target image (None: that equals the clean one)
                    row["target_prediction"] = target_answer
                    row["target_hit"] = (None if normalize_text(target_answer) == normalize_text(clean_answer)
                                         else normalize_text(answer) == normalize_text(target_answer))
                if settings.task == "vqa":
                    row["score"] = vqa_score(answer, refs)
                writer.write(row)
                done[key] = row
                if on_result is not None:
                    on_result(row)


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

def summarize(output_dir: str | os.PathLike, settings: EvalSettings, dataset_ids: Optional[Sequence[str]] = None,
              write: bool = True) -> dict[str, Any]:
    """Summary table (markdown + JSON) and plots from the result rows of ``output_dir``.

    One table row per (variant, budget): accuracy (VQA accuracy, or CIDEr/BLEU-4/ROUGE-L for captions),
    attack success (answer changed / target hit), mean FCS clean vs adversarial and, for FS variants
    with certification, the mean S_low and certified FCSB at radius sigma/2. Raises ValueError when
    a key of the run is missing (an unfinished run).
    """
    from fs_mllm.evaluation import caption_metrics, certified_curve, plot_accuracy_vs_budget, plot_certified_curve
    from fs_mllm.evaluation import summary_table

    out = Path(output_dir)
    rows = read_results(out)
    if dataset_ids is None:
        dataset_ids = sorted({k[0] for k in rows}, key=lambda i: min(r["index"] for k, r in rows.items() if k[0] == i))
    missing = [(i, v, b) for i in dataset_ids for v in settings.variants for b in settings.budgets
               if _key(i, v, b) not in rows]
    if missing:
        raise ValueError(f"{len(missing)} results missing in {str(out)!r} (e.g. {missing[:3]}); rerun the same "
                         "command to finish the run")
    table_rows: list[dict[str, Any]] = []
    accuracy: dict[str, list[float]] = {}
    curves: dict[str, Any] = {}
    metric_name = "vqa_accuracy" if settings.task == "vqa" else "CIDEr"
    for variant in settings.variants:
        for budget in settings.budgets:
            sel = [rows[_key(i, variant, budget)] for i in dataset_ids]
            entry: dict[str, Any] = {"variant": variant,
                                     "attack": "none" if budget == 0 else f"{settings.protocol} {settings.attack_norm} {settings.objective}",
                                     "eps": budget, "n": len(sel)}
            if settings.task == "vqa":
                entry["vqa_accuracy"] = sum(r["score"] for r in sel) / len(sel)
            else:
                cm = caption_metrics([r["prediction"] for r in sel], [r["references"] for r in sel],
                                     meteor=False, tokenizer="simple")
                for m in ("CIDEr", "BLEU-4", "ROUGE-L"):
                    entry[m] = cm[m]
            if budget > 0:
                entry["attack_success_rate"] = sum(bool(r["changed"]) for r in sel) / len(sel)
                if settings.objective == "targeted":
                    entry["target_hit_rate"] = sum(bool(r.get("target_hit")) for r in sel) / len(sel)
                elif settings.objective == "feature_target":
                    aimed = [r["target_hit"] for r in sel if r.get("target_hit") is not None]
                    entry["targeted_success"] = sum(aimed) / len(aimed) if aimed else None
                fcs = [r["fcs"] for r in sel if r.get("fcs") is not None]
                entry["fcs_mean"] = sum(fcs) / len(fcs) if fcs else None
            else:
                entry["attack_success_rate"] = None
                entry["fcs_mean"] = None
            if settings.certify_n and variant != "base":
                s_low = [rows[_key(i, variant, 0.0)].get("s_low") for i in dataset_ids]
                s_low = [s for s in s_low if s is not None]
                if s_low and budget == 0:
                    entry["mean_s_low"] = sum(s_low) / len(s_low)
                    entry["certified_fcsb@sigma/2"] = certified_curve(s_low, settings.sigma, [settings.sigma / 2])["mean_bound"][0]
                    curves[variant] = certified_curve(s_low, settings.sigma)
                elif s_low and settings.attack_norm == "l2":
                    # the certificate at the attack's own radius, next to the measured FCS
                    entry["certified_fcsb@eps"] = certified_curve(s_low, settings.sigma, [budget])["mean_bound"][0]
            accuracy.setdefault(variant, []).append(entry[metric_name])
            table_rows.append(entry)
    markdown, table = summary_table(table_rows)
    summary = {"settings": settings.to_dict(), "num_examples": len(dataset_ids), "metric": metric_name,
               "table": table, "accuracy_vs_budget": {"budgets": list(settings.budgets), "values": accuracy},
               "certified_curves": curves, "plots": {}}
    if write:
        if curves:
            summary["plots"]["certified_curve"] = plot_certified_curve(
                curves, out / CURVE_PNG, threshold=0.5, title=f"certified FCSB, sigma={settings.sigma}")
        if settings.attack_eps:
            summary["plots"]["accuracy_vs_budget"] = plot_accuracy_vs_budget(
                list(settings.budgets), accuracy, out / BUDGET_PNG,
                xlabel=f"attack budget eps ({settings.attack_norm}, [0,1] pixels)", ylabel=metric_name,
                title=f"{settings.task}: {settings.objective} attack")
        summary["plots"] = {k: os.fspath(v) for k, v in summary["plots"].items()}
        (out / SUMMARY_MD).write_text(markdown, encoding="utf-8")
        tmp = out / (SUMMARY_JSON + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, out / SUMMARY_JSON)
    summary["markdown"] = markdown
    return summary


EVAL_DESCRIPTIONS = {
    "vqa": """VQA robustness evaluation: base vs FS vs FS+GSB, clean and under attack, with certified FCSB curves.

Runs out of the box on the embedded offline model and eval set:

    fs-mllm eval vqa --output-dir runs/vqa --limit 8 --attack-eps 0.5 1.0 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_vqa.py --output-dir runs/vqa ...   # sharded

Stop it (Ctrl-C, a kill) and rerun the same command to resume (results.rank*.jsonl are append-only; a
rerun with other settings into a folder that holds results is refused, and so is a second run writing
to the same folder at once). Outputs: summary.md, summary.json, certified_curve.png, accuracy_vs_budget.png.
""",
    "caption": """Captioning robustness evaluation (CIDEr, BLEU-4, ROUGE-L): base vs FS vs FS+GSB, clean and attacked.

Runs out of the box on the embedded offline model and eval set:

    fs-mllm eval caption --output-dir runs/caption --limit 8 --attack-eps 0.5 --certify-n 100
    accelerate launch --num_processes 2 recipes/eval_caption.py --output-dir runs/caption ...   # sharded

Stop it (Ctrl-C, a kill) and rerun the same command to resume (results.rank*.jsonl are append-only; a
rerun with other settings into a folder that holds results is refused, and so is a second run writing
to the same folder at once). Caption metrics are corpus-level (CIDEr's IDF comes from the reference
set), so they are computed over the whole set at summary time, with the pure-Python tokenizer and
without METEOR (no JVM start).
""",
}


def add_common_arguments(parser: Any, task: str) -> None:
    """The eval command line (``fs-mllm eval vqa|caption``, recipes/eval_vqa.py, recipes/eval_caption.py).

    Numbers are checked by their argparse ``type`` (exit 2 with usage before anything loads)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'fs-mini-llava' (embedded offline LLaVA) or a model id / local folder")
    parser.add_argument("--dataset", default="fs-offline-eval", help="'fs-offline-eval' (real photos), 'fs-synthetic-heldout' (fs-mini-llava's own task), a local folder or a Hub id")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--variants", default="base,fs", help="comma list of base, fs, fs+gsb")
    add_fs_config_arguments(parser, ("sigma", "n_samples", "seed"))
    parser.add_argument("--booster", default=None,
                        help="GaussianSmoothnessBooster folder (for fs+gsb; default for fs-mini-llava: its shipped booster)")
    parser.add_argument("--attack-norm", default="l2", choices=NORMS)
    parser.add_argument("--attack-eps", type=positive_float, nargs="*", default=[],
                        help="attack budgets (several for accuracy vs budget); none = clean only")
    parser.add_argument("--attack-steps", type=positive_int, default=10)
    parser.add_argument("--attack-step-size", type=positive_float, default=None, help="default 2.5 * eps / steps")
    parser.add_argument("--objective", default="feature", choices=OBJECTIVES,
                        help="feature_target pulls the features towards the next example's image (AttackVLM)")
    parser.add_argument("--protocol", default="adaptive", choices=PROTOCOLS,
                        help="adaptive: through each variant's smoothed path (EOT); transfer: the paper's protocol, "
                             "crafted once on the undefended model and replayed on every variant")
    parser.add_argument("--crop-scale", type=fraction_pair, default=None,
                        help="M-Attack random local crops: 'lo,hi' area fractions (e.g. 0.5,1), default none")
    parser.add_argument("--target", default=None, help="target text for --objective targeted")
    parser.add_argument("--eot-samples", type=positive_int, default=1,
                        help="noisy forwards averaged per attack gradient on FS variants (fresh noise every step)")
    parser.add_argument("--certify-n", type=non_negative_int, default=0,
                        help="noise samples to certify each image (0 = off, else >= 2)")
    parser.add_argument("--certify-alpha", type=probability, default=0.001)
    parser.add_argument("--limit", type=positive_int, default=None, help="first N examples only")
    parser.add_argument("--max-new-tokens", type=positive_int, default=10 if task == "vqa" else 24)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    if task == "caption":
        parser.add_argument("--prompt", default=EvalSettings.caption_prompt, help="caption instruction")
    parser.add_argument("--output-dir", required=True, help="results folder; rerun the same command to resume")
    parser.add_argument("--no-progress", action="store_true")


def settings_from_args(args: Any, task: str) -> EvalSettings:
    """EvalSettings from the parsed command-line arguments."""
    kwargs = dict(
        task=task, model=args.model, dataset=args.dataset, split=args.split, variants=args.variants,
        sigma=args.sigma, n_samples=args.n_samples, seed=args.seed, booster=args.booster,
        attack_norm=args.attack_norm, attack_eps=tuple(args.attack_eps or ()), attack_steps=args.attack_steps,
        attack_step_size=args.attack_step_size, objective=args.objective, target=args.target,
        protocol=args.protocol, crop_scale=args.crop_scale,
        eot_samples=args.eot_samples,
        certify_n=args.certify_n, certify_alpha=args.certify_alpha, max_new_tokens=args.max_new_tokens,
        limit=args.limit, dtype=args.dtype,
    )
    if task == "caption":
        kwargs["caption_prompt"] = args.prompt
    return EvalSettings(**kwargs)


def main(task: str, argv: Optional[Iterable[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm eval vqa|caption`` and the eval recipes: parse ``argv`` (default ``sys.argv[1:]``), run
    or resume, print the summary table. Every setting is checked before anything is loaded."""
    import argparse

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    parser = argparse.ArgumentParser(prog=prog, description=EVAL_DESCRIPTIONS[task],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, task)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        settings = settings_from_args(args, task)
    except ValueError as exc:
        parser.error(str(exc))
    summary = run_eval(settings, args.output_dir, progress=not args.no_progress)
    if summary is not None:
        print(summary["markdown"])
        print(f"results: {args.output_dir} ({SUMMARY_MD}, {SUMMARY_JSON}"
              + "".join(f", {os.path.basename(p)}" for p in summary["plots"].values()) + ")")
    return 0
