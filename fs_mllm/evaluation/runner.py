"""Resumable, shardable robustness evaluation of a multimodal LLM: base vs FS vs FS+GSB, clean and attacked.

Why it is built this way:

* **Resumable.** Every (example id, variant, attack budget) result is one JSON line, written with
  flush + fsync the moment it exists. A killed run is rerun with the same command: existing lines are
  read, done keys are skipped, a truncated last line (the crash happened mid-write) is cut off before
  appending, and nothing already written is rewritten (the store is :mod:`fs_mllm.results`,
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

Settings and their folder check live in :mod:`fs_mllm.evaluation.settings`, the shard files in
:mod:`fs_mllm.results`, the table and plots in :mod:`fs_mllm.evaluation.summary`; this module
keeps the per-example context, the attack glue and the run loop.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from fs_mllm.adapters import get_adapter
from fs_mllm.attacks import NORMS, OBJECTIVES, AttackConfig, attack, feature_cosine, input_features, without_added_defaults
from fs_mllm.certify import certify_model
from fs_mllm.defense import VARIANTS, apply_variant
from fs_mllm.evaluation.datasets import load_eval_dataset
from fs_mllm.results import (
    ResultsFolder, finite_or_none, folder_kept_only_with_rows, read_results, result_key, shard_path,
)
from fs_mllm.evaluation.robustness import normalize_text, targeted_success
from fs_mllm.image_io import rgb
from fs_mllm.evaluation.settings import (  # the public names stay importable from here
    RESUME_RULE, SETTINGS_FILE, EvalSettings, SettingsMismatchError,
)
from fs_mllm.evaluation.summary import summarize
from fs_mllm.evaluation.vqa import vqa_score
from fs_mllm.booster.model import GaussianSmoothnessBooster
from fs_mllm.models.loading import DEFAULT_MODEL, load_model  # one loader for all entry points
from fs_mllm.models.mini_llava import build_prompt
from fs_mllm.normalization import resolve_mean_std
from fs_mllm.patching import unpatch_model

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
]

BARRIER_TIMEOUT_HOURS = 48


# ---------------------------------------------------------------------------------------------
# model, prompts, features
# ---------------------------------------------------------------------------------------------

def build_prompt_for(processor: Any, text: str, model_id: str = "") -> str:
    """The model's prompt for one image + one text: fs-mini-llava's trained format, else the chat template,
    else ``<image>\\n{text}`` (what LLaVA-style processors expand)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty str (question or caption instruction)")
    if model_id == DEFAULT_MODEL:
        return build_prompt(text)
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"{token}\n{text}"


class _Context:
    """One example prepared for one model: processor inputs, [0,1] pixels and the family kwargs."""

    def __init__(self, model: Any, processor: Any, image: Any, prompt: str) -> None:
        self.model, self.processor, self.image, self.prompt = model, processor, image, prompt
        self.adapter = get_adapter(model)
        self.mean, self.std = resolve_mean_std(model, self.adapter, processor)
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
        return input_features(self.model, self.model_inputs(pixels01), 1).float()

    def generate(self, pixels01: Optional[torch.Tensor], max_new_tokens: int) -> str:
        """Greedy answer from the processor's own inputs (pixels swapped when attacked).

        Not :func:`fs_mllm.attacks.generate_text`: that rebuilds the prompt from a PIL copy of [0,1]
        pixels, so the clean answer would come from rounded, re-processed pixels instead of the
        processor's output, and stored rows would change.
        """
        inputs = self.model_inputs(pixels01)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()


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
    objective = objective_for(settings, clean_answer)
    config = AttackConfig(norm=settings.attack_norm, eps=eps, steps=settings.attack_steps,
                          step_size=settings.attack_step_size, objective=objective, protocol=settings.protocol,
                          crop_scale=settings.crop_scale, crop_views=settings.crop_views,
                          crop_full_view=settings.crop_full_view,
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
    return GaussianSmoothnessBooster.from_pretrained(path).eval()


def _distributed() -> Any:
    """accelerate's process state; the barrier timeout is long because at a resume one rank may have
    finished its shard earlier and waits at the final barrier for the others' remaining work (a crashed
    rank still ends the run: the launcher stops the group). accelerate is imported here, not at module
    level: it adds ~200 modules to ``fs-mllm eval vqa --help`` and to every import of the settings."""
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
    if _distributed().num_processes > 1:  # other processes share the folder: none of them removes it
        return _run_eval(settings, out, model, processor, dataset, attack_fn, on_result, progress)
    with folder_kept_only_with_rows(out, "results.rank*.jsonl"):
        return _run_eval(settings, out, model, processor, dataset, attack_fn, on_result, progress)


def _run_eval(settings: EvalSettings, out: Path, model: Any, processor: Any, dataset: Any, attack_fn: Optional[AttackFn],
              on_result: Optional[Callable[[dict[str, Any]], None]], progress: bool) -> Optional[dict[str, Any]]:
    dist = _distributed()
    rank, world = dist.process_index, dist.num_processes
    out.mkdir(parents=True, exist_ok=True)
    attack, attack_name = _resolve_attack(attack_fn)
    # the crop fields added since folders were first written stay out at their old values: older folders resume
    stored = {**without_added_defaults(settings.to_dict()), "attack_impl": attack_name}
    # one shard per process, every shard read before the barrier; the main process claims settings.json, every one
    # checks it after the barrier (so none waits forever below)
    results = ResultsFolder(out, stored, rows_file=shard_path(out, rank).name, shards=True,
                            claims=dist.is_main_process, synchronize=dist.wait_for_everyone, key=result_key, **RESUME_RULE)
    try:
        done = results.done

        if dataset is None:
            dataset = load_eval_dataset(settings.dataset, task=settings.task, split=settings.split)
        n_total = len(dataset) if settings.limit is None else min(settings.limit, len(dataset))
        ids = [str(v) for v in dataset["question_id" if settings.task == "vqa" else "image_id"][:n_total]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {settings.dataset!r}: example ids are not unique; results are keyed by id")
        my_indices = list(range(rank, n_total, world))
        todo = [i for i in my_indices
                if any(result_key(ids[i], v, b) not in done for v in settings.variants for b in settings.budgets)]

        if todo:
            if model is None:
                device = dist.device if torch.cuda.is_available() else "cpu"
                model, processor = load_model(settings.model, device=device, dtype=settings.dtype)
            elif processor is None:
                raise ValueError("processor is required when model is passed in memory")
            booster = _load_booster(settings.booster) if "fs+gsb" in settings.variants else None
            _run_shard(settings, model, processor, dataset, todo, ids, results, attack,
                       on_result, progress and dist.is_main_process, booster, rank, world)
    finally:
        results.close()
        if model is not None:
            unpatch_model(model)
    dist.wait_for_everyone()
    if not dist.is_main_process:
        return None
    summary = summarize(out, settings, dataset_ids=ids)
    return summary


def _run_shard(settings: EvalSettings, model: Any, processor: Any, dataset: Any, todo: list[int], ids: list[str],
               results: ResultsFolder, attack: AttackFn, on_result: Optional[Callable],
               show_progress: bool, booster: Any, rank: int, world: int) -> None:
    done = results.done

    def record(key: tuple, row: dict[str, Any]) -> None:
        results.put(key, row)  # durable first: a key counts as done once its row is on disk
        if on_result is not None:
            on_result(row)

    for variant in settings.variants:
        apply_variant(model, variant, settings.fs, processor, booster)
        bar = tqdm(todo, desc=f"{settings.task} [{variant}] rank {rank}/{world}", disable=not show_progress)
        for index in bar:
            ex = dataset[index]
            example_id, text, refs = _example_fields(settings.task, ex, settings)
            keys = {b: result_key(example_id, variant, b) for b in settings.budgets}
            if all(k in done for k in keys.values()):
                continue
            prompt = build_prompt_for(processor, text, settings.model)
            ctx = _Context(model, processor, rgb(ex["image"]), prompt)
            target_answer = None
            if settings.objective == "feature_target" and settings.attack_eps:
                target_index = (index + 1) % len(dataset)  # another example's image: the AttackVLM target
                ctx.target = _Context(model, processor, rgb(dataset[target_index]["image"]), prompt)
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
                    cert = certify_model(model, ctx.pixels01, n=settings.certify_n, alpha=settings.fs.alpha,
                                         **ctx.extra)[0]
                    row["s_low"] = finite_or_none(float(cert.score_lower))
                    row["s_mean"] = finite_or_none(float(cert.score_mean))
                    row["fcsb_half_sigma"] = finite_or_none(float(cert.fcsb(settings.fs.sigma / 2)))
                record(clean_key, row)

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
                seed = (settings.fs.seed + 7919 * index + int(round(budget * 1e6))) % (2 ** 31)
                adv = attack(ctx, budget, settings, clean_answer, seed)
                if not isinstance(adv, torch.Tensor) or adv.shape != ctx.pixels01.shape:
                    raise ValueError(f"attack_fn must return adversarial [0,1] pixels of shape {tuple(ctx.pixels01.shape)}")
                with torch.no_grad():
                    adv_features = ctx.features(adv)
                answer = ctx.generate(adv, settings.max_new_tokens)
                dist_l2 = float((adv - ctx.pixels01).flatten().norm())
                dist_linf = float((adv - ctx.pixels01).abs().max())
                row = {**base_row, "key": list(key), "budget": budget, "norm": settings.attack_norm,
                       "prediction": answer, "clean_prediction": clean_answer,
                       "fcs": finite_or_none(float(feature_cosine(clean_features, adv_features))),
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
                record(key, row)
