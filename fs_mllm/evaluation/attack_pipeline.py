"""Attack a multimodal LLM end to end (base, feature-space smoothed, smoothed + booster) and report per example.

    fs-mllm attack --model llava-hf/llava-1.5-7b-hf --offline-eval vqa --limit 8 \\
        --objective untargeted --norm l2 --eps 0.5 --steps 20 --eot-samples 8 --modes base,fs --out runs/attack
    fs-mllm attack --model ./my-local-model --images ./photos --question "Describe the image." \\
        --objective targeted --target-text "a photo of a dog" --norm linf --eps 0.0314 --out runs/attack_dog

(``python recipes/attack_pipeline.py ...`` takes the same options.) For each image: the processor
resizes/crops it, the [0,1] image at processor resolution is recovered through the family adapter, and
a PGD attack (fs_mllm.attacks) runs against each mode: ``base`` (unpatched), ``fs`` (patch_model with
--sigma/--n-samples; the attack is adaptive, EOT over the smoothing noise) and ``fs+gsb`` (the same plus
--booster). Outputs, under --out:

- ``adv/<example>_<mode>_<settings>.png``: the adversarial image at processor resolution (8-bit PNG,
  so the saved file is the attack rounded to 1/255; the metrics are computed on the unrounded float image);
- ``results.jsonl``: one line per (example, mode, settings), in the append-only results store of the
  evaluations: stop it (Ctrl-C, a kill) and rerun the same command to resume (finished rows are skipped,
  a torn last line is cut); a rerun with other settings (another --seed, --eps, ...) adds its own rows;
  a second run writing to the same folder at once is refused;
- a markdown summary table on stdout (mean FCS, attack success rate, mean ||delta|| per mode).

Success: targeted = target text in the adversarial output; untargeted/feature = answer wrong (VQA score
0, with --offline-eval vqa) or, without reference answers, output changed from the clean output.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from fs_mllm.adapters import get_adapter
from fs_mllm.arguments import (add_crop_view_arguments, add_fs_config_arguments, device, existing_folder, fraction_pair,
                               fs_config_from_args, non_negative_int, positive_float, positive_int)
from fs_mllm.attacks import ENSEMBLE_WEIGHTINGS, OBJECTIVES, PROTOCOLS, SURROGATES, AttackConfig, attack, generate_text, without_added_defaults
from fs_mllm.config import ATTACK_EOT_SAMPLES, ATTACK_STEPS, COMMAND_ATTACK_STEPS
from fs_mllm.image_io import IMAGE_SUFFIXES, rgb
from fs_mllm.surrogates import check_surrogates
from fs_mllm.defense import VARIANTS, apply_variant
from fs_mllm.results import ResultWriter, finite_or_none, folder_kept_only_with_rows, read_rows
from fs_mllm.evaluation.robustness import attack_outcomes, outcome_rate, summary_table
from fs_mllm.evaluation.runner import build_prompt_for
from fs_mllm.models.loading import DEFAULT_MODEL, load_model
from fs_mllm.normalization import resolve_mean_std
from fs_mllm.patching import unpatch_model

__all__ = ["MODES", "RESULTS_FILE", "parse_args", "main"]

MODES = VARIANTS
RESULTS_FILE = "results.jsonl"
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """The command line, checked in full (the attack config included) before anything is loaded."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder of a supported multimodal model (+ processor); default {DEFAULT_MODEL}, the embedded offline model")
    p.add_argument("--processor", help="processor id/folder if it is not saved with the model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=existing_folder, help="folder of images (attacked with --question)")
    src.add_argument("--offline-eval", choices=("vqa", "caption"), help="the shipped real-photo eval set (default: vqa)")
    p.add_argument("--limit", type=positive_int, help="attack at most this many examples")
    p.add_argument("--question", default="Describe the image.", help="prompt for --images and --offline-eval caption")
    p.add_argument("--prompt-template", help="e.g. 'USER: {image}\\n{question} ASSISTANT:' ({image} = the image token); "
                                              "default: the processor's chat template, else '{image}{question}'")
    p.add_argument("--objective", choices=OBJECTIVES, default="feature")
    p.add_argument("--target-text", help="what the model should say (objective targeted)")
    p.add_argument("--target-image", help="image file whose features the attack pulls towards (objective feature_target)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="adaptive",
                   help="adaptive: through each mode's smoothed path (EOT); transfer: the paper's protocol, crafted "
                        "without the defense (the model's own undefended path, or --surrogates) and replayed")
    p.add_argument("--surrogates", help=f"comma-separated surrogate encoders for --protocol transfer: {', '.join(SURROGATES)}, "
                                        "m-attack (M-Attack's three CLIP encoders, from the Hub), or a transformers "
                                        "encoder's Hub id or folder; several = an ensemble; default: the model's own "
                                        "undefended path (the stronger, grey-box case)")
    p.add_argument("--ensemble-weighting", choices=ENSEMBLE_WEIGHTINGS, default="mean",
                   help="how several --surrogates add up: mean (their mean cosine, M-Attack's; default) or gradient "
                        "(each member's gradient scaled to the same norm per image, so no encoder takes the whole step)")
    p.add_argument("--crop-scale", type=fraction_pair, help="M-Attack random local crops: 'lo,hi' area fractions")
    add_crop_view_arguments(p)
    p.add_argument("--norm", choices=("l2", "linf"), default="l2")
    p.add_argument("--eps", type=positive_float, default=0.5, help="radius in [0,1] pixel space")
    p.add_argument("--steps", type=positive_int, default=COMMAND_ATTACK_STEPS,
                   help=f"PGD steps (default {COMMAND_ATTACK_STEPS}; the benchmark's adaptive attack runs {ATTACK_STEPS})")
    p.add_argument("--step-size", type=positive_float, help="default 2.5 * eps / steps")
    p.add_argument("--no-random-start", action="store_true")
    p.add_argument("--eot-samples", type=positive_int, default=ATTACK_EOT_SAMPLES, help="noisy forwards per gradient on smoothed modes")
    p.add_argument("--eot-chunk-size", type=positive_int, help="forwards per backward (memory knob; default all)")
    p.add_argument("--smoothing-samples", type=positive_int, help="noisy copies per smoothed forward while attacking "
                                                                  "(default: --n-samples, i.e. the deployed model)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--modes", default="base,fs", help=f"comma-separated subset of {list(MODES)}")
    add_fs_config_arguments(p, ("sigma", "n_samples"))
    p.add_argument("--booster", type=existing_folder, help="folder of a saved GaussianSmoothnessBooster (mode fs+gsb)")
    p.add_argument("--max-new-tokens", type=positive_int, default=20)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda when torch sees a GPU, else cpu)")
    p.add_argument("--out", required=True, help="output folder (adv/ PNGs and results.jsonl); rerun to resume")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        p.error(f"--modes must be a comma-separated subset of {list(MODES)}, got {args.modes!r}")
    if "fs+gsb" in modes and not args.booster:
        p.error("--modes fs+gsb needs --booster FOLDER")
    args.modes = modes
    try:
        args.config = AttackConfig(
            norm=args.norm, eps=args.eps, steps=args.steps, step_size=args.step_size,
            random_start=not args.no_random_start, objective=args.objective, target_text=args.target_text,
            protocol=args.protocol, crop_scale=args.crop_scale, crop_views=args.crop_views,
            crop_full_view=args.crop_full_view, ensemble_weighting=args.ensemble_weighting, eot_samples=args.eot_samples,
            eot_chunk_size=args.eot_chunk_size,
            smoothing_samples=args.smoothing_samples, seed=args.seed,
        )
    except ValueError as exc:
        p.error(str(exc))
    if (args.objective == "feature_target") != (args.target_image is not None):
        p.error("--target-image goes with --objective feature_target (and that objective needs it)")
    if args.target_image is not None and not os.path.isfile(args.target_image):
        p.error(f"--target-image: {args.target_image!r} is not a file")
    args.surrogates = [s.strip() for s in args.surrogates.split(",") if s.strip()] if args.surrogates else None
    if args.ensemble_weighting != "mean" and not args.surrogates:
        p.error("--ensemble-weighting weighs the members of --surrogates; give them, or drop it")
    if args.surrogates:
        if args.protocol != "transfer":
            p.error("--surrogates go with --protocol transfer")
        try:
            check_surrogates(args.surrogates)
        except ValueError as error:
            p.error(f"--{error}")
    return args


def settings_id(args: argparse.Namespace) -> str:
    """Short hash of everything besides (example, mode) that decides a row: part of its key, so a rerun
    of the same command skips its rows and a run with other settings adds its own."""
    settings = {
        "model": args.model, "processor": args.processor, "dtype": args.dtype,
        "source": os.path.abspath(args.images) if args.images else (args.offline_eval or "vqa"),
        "question": args.question, "prompt_template": args.prompt_template, "attack": without_added_defaults(args.config.to_dict()),
        "sigma": args.sigma, "n_samples": args.n_samples, "max_new_tokens": args.max_new_tokens,
        "booster": os.path.abspath(args.booster) if args.booster else None,
        "target_image": os.path.abspath(args.target_image) if args.target_image else None,
        "surrogates": args.surrogates,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def iter_examples(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Examples as dicts: id, PIL image, question, reference answers (or None)."""
    from PIL import Image

    if args.images:
        folder = Path(args.images)
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        stems = collections.Counter(f.stem for f in files)
        shared = sorted(f.name for f in files if stems[f.stem] > 1)
        if shared:  # a row's key is the stem, so two such images would be one row
            raise SystemExit(f"--images {folder}: {', '.join(shared)} share a name before the suffix; rename one of each")
        for path in files[: args.limit]:
            yield {"id": path.stem, "image": rgb(Image.open(path)), "question": args.question, "answers": None}
        return
    # the shipped eval set, read lazily: only the photos of the examples attacked are decoded
    from fs_mllm.data import OFFLINE_EVAL_ANNOTATIONS
    from fs_mllm.evaluation.datasets import load_offline_photo

    task = args.offline_eval or "vqa"
    with open(OFFLINE_EVAL_ANNOTATIONS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    count = 0
    for record in records:
        items = ([(f"q{q['question_id']}", q["question"], list(q["answers"])) for q in record["questions"]]
                 if task == "vqa" else [(f"img{record['image_id']}", args.question, None)])
        photo = None
        for example_id, question, answers in items:
            if args.limit is not None and count >= args.limit:
                return
            photo = photo or load_offline_photo(record["source"])
            count += 1
            yield {"id": example_id, "image": photo, "question": question, "answers": answers}


def make_prompt(processor: Any, question: str, template: str | None, model_id: str = "") -> str:
    if template:
        return template.format(image=getattr(processor, "image_token", None) or "<image>", question=question)
    return build_prompt_for(processor, question, model_id)


def processor_resolution_image(model, processor, image, prompt: str, mean, std) -> tuple[torch.Tensor, dict, dict]:
    """The [0,1] image (1, ..., 3, H, W) the model sees after resize/crop, its per-image family kwargs, and
    the prompt tokens the processor made for the original image (image-token count included)."""
    adapter = get_adapter(model)
    encoded = processor(text=[prompt], images=[image], return_tensors="pt")
    kwargs = {k: encoded[k] for k in adapter.per_image_kwargs if k in encoded}
    pixels = adapter.model_inputs_to_pixels(model, encoded["pixel_values"].float(), mean, std, **kwargs)
    if isinstance(pixels, list):
        raise SystemExit("images of different shapes in one example are not supported by this command")
    tokens = {k: encoded[k] for k in TOKEN_KEYS if k in encoded}
    return pixels.clamp(0, 1), kwargs, tokens


def save_png(image01: torch.Tensor, path: Path) -> str:
    """Save (3, H, W) or (crops, 3, H, W) [0,1] pixels; several crops go side by side."""
    from PIL import Image

    image = image01.detach().float().cpu()
    if image.ndim == 4:
        image = torch.cat(list(image), dim=-1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _outcomes(clean_outputs: list[str], adv_outputs: list[str], answers: list, args: argparse.Namespace) -> list[Optional[bool]]:
    """Per row: the attack won, lost, or had nothing to win (None: the clean answer was wrong, or on target, already)."""
    if args.objective == "targeted":
        return attack_outcomes(adv_outputs, clean_outputs, targets=[args.target_text] * len(adv_outputs))
    if all(a is not None for a in answers):
        return attack_outcomes(adv_outputs, clean_outputs, answers_list=answers)
    return attack_outcomes(adv_outputs, clean_outputs)


def _attack_one(model, processor, example: dict, mode: str, args: argparse.Namespace, mean, std,
                out: Path, run_id: str, settings: str) -> dict[str, Any]:
    """One (example, mode) result row; the model is already patched for ``mode``."""
    config = args.config
    prompt = make_prompt(processor, example["question"], args.prompt_template, args.model)
    images01, image_kwargs, tokens = processor_resolution_image(model, processor, example["image"], prompt, mean, std)
    start = time.time()
    clean_output = generate_text(model, processor, images01, tokens, args.max_new_tokens, mean, std, **image_kwargs)[0]
    target = None
    if args.target_image is not None:
        from PIL import Image

        target, _, _ = processor_resolution_image(model, processor, rgb(Image.open(args.target_image)), prompt, mean, std)
    # transfer + untargeted: the undefended model's own answer is pushed away, so every mode gets the same image
    untargeted_answers = [clean_output] if args.objective == "untargeted" and args.protocol == "adaptive" else None
    result = attack(model, processor, images01, tokens, config, answers=untargeted_answers,
                    image_mean=mean, image_std=std, target_images=target, surrogates=args.surrogates, **image_kwargs)
    adv_output = generate_text(model, processor, result.adv_images, tokens, args.max_new_tokens, mean, std,
                               **image_kwargs)[0]
    success = _outcomes([clean_output], [adv_output], [example["answers"]], args)[0]
    # an absolute path: the row stays valid whatever folder a later run or reader starts in
    png = save_png(result.adv_images[0], out.resolve() / "adv" / f"{example['id']}_{mode.replace('+', '_')}_{settings}.png")
    return {
        "key": [example["id"], mode, settings], "run": run_id, "example": example["id"], "mode": mode,
        "question": example["question"], "answers": example["answers"], "clean_output": clean_output,
        "adv_output": adv_output, "success": success, "fcs": finite_or_none(result.fcs[0]),
        "delta_norm": finite_or_none(result.delta_norm[0]), "final_loss": finite_or_none(result.final_loss),
        "adv_image": png, "seconds": round(time.time() - start, 2), "model": args.model,
        "sigma": None if mode == "base" else args.sigma, "n_samples": None if mode == "base" else args.n_samples,
        "attack": config.to_dict(),
    }


def _attack_all(args: argparse.Namespace, out: Path) -> tuple[dict, list]:
    """Attack every (example, mode) not in ``out`` yet; the rows of this command, and its examples."""
    from tqdm.auto import tqdm

    results_path = out / RESULTS_FILE  # the folder exists: folder_kept_only_with_rows made or found it
    settings = settings_id(args)
    with ResultWriter(results_path) as writer:  # locked, torn tail cut, before the rows are read
        done = {tuple(row["key"]): row for row in read_rows(results_path)}
        examples = list(iter_examples(args))
        keys = {(e["id"], m): (e["id"], m, settings) for e in examples for m in args.modes}
        rows = {k: done[key] for k, key in keys.items() if key in done}
        if len(rows) < len(keys):
            model, processor = load_model(args.model, args.device, args.dtype, processor=args.processor)
            adapter = get_adapter(model)
            mean, std = resolve_mean_std(model, adapter, processor)
            booster = None
            if "fs+gsb" in args.modes:
                from fs_mllm.gsb import GaussianSmoothnessBooster

                booster = GaussianSmoothnessBooster.from_pretrained(args.booster, device=args.device)
            run_id = time.strftime("%Y%m%dT%H%M%S")
            try:
                with tqdm(total=len(keys) - len(rows), desc="attack") as bar:
                    for example in examples:
                        for mode in args.modes:
                            if (example["id"], mode) in rows:
                                continue
                            # patched afresh per row: its noise stream starts at --seed, so a row does
                            # not depend on which rows ran before it (a resumed run equals an unbroken one)
                            apply_variant(model, mode, fs_config_from_args(args), processor, booster)
                            row = _attack_one(model, processor, example, mode, args, mean, std, out, run_id, settings)
                            writer.write(row)
                            rows[(example["id"], mode)] = row
                            bar.update(1)
            finally:
                unpatch_model(model)
    return rows, examples


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm attack`` and recipes/attack_pipeline.py: parse ``argv`` (default ``sys.argv[1:]``), attack
    what is not in ``--out`` yet, print the summary of this command's rows."""
    args = parse_args(argv, prog)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; name a folder")
    with folder_kept_only_with_rows(out, RESULTS_FILE):  # a run that fails before its first row leaves no folder
        rows, examples = _attack_all(args, out)
    results_path = out / RESULTS_FILE
    summary = []
    for mode in args.modes:
        mine = [rows[(e["id"], mode)] for e in examples]
        # from the stored answers, so rows written before the rule changed are counted by it too
        outcomes = _outcomes([r["clean_output"] for r in mine], [r["adv_output"] for r in mine], [r["answers"] for r in mine], args)
        summary.append({
            "mode": mode, "examples": len(mine),
            "mean_fcs": _mean(r["fcs"] for r in mine),
            "attack_success_rate": outcome_rate(outcomes),
            "counted": sum(o is not None for o in outcomes),
            "mean_delta_norm": _mean(r["delta_norm"] for r in mine),
        })
    table, _ = summary_table(summary)
    config = args.config
    print(f"\n{config.protocol} {config.objective} {config.norm} PGD, eps={config.eps:g}, steps={config.steps}, "
          f"eot_samples={config.eot_samples}; results in {results_path}\n")
    print(table)
    return 0


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
