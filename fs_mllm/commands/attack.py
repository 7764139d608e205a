"""Attack a multimodal LLM end to end (base, feature-space smoothed, smoothed + booster) and report per example.

    fs-mllm attack --model llava-hf/llava-1.5-7b-hf --offline-eval vqa --limit 8 \\
        --objective untargeted --norm l2 --eps 0.5 --steps 20 --eot-samples 8 --modes base,fs --out runs/attack
    fs-mllm attack --model ./my-local-model --images ./photos --question "Describe the image." \\
        --objective targeted --target-text "a photo of a dog" --norm linf --eps 0.0314 --out runs/attack_dog

(``python recipes/attack_pipeline.py ...`` takes the same options; from Python,
``fs_mllm.evaluation.attack_pipeline.run_attack(AttackRun(...))`` runs the same.) For each image: the
processor resizes/crops it, the [0,1] image at processor resolution is recovered through the family
adapter, and a PGD attack (fs_mllm.attacks) runs against each mode: ``base`` (unpatched), ``fs``
(patch_model with --sigma/--n-samples; the attack is adaptive, EOT over the smoothing noise) and
``fs+gsb`` (the same plus --booster). Outputs, under --out:

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
from typing import Optional, Sequence

from ..arguments import (add_crop_view_arguments, add_fs_config_arguments, device, existing_folder, fraction_pair,
                         non_negative_int, positive_float, positive_int, settings_or_usage_error)
from ..attacks import ENSEMBLE_WEIGHTINGS, NORMS, OBJECTIVES, PROTOCOLS, SURROGATES, AttackConfig
from ..config import ATTACK_STEPS, COMMAND_ATTACK_STEPS
from ..evaluation.attack_pipeline import (DTYPES, MODES, OFFLINE_EVAL_TASKS, AttackRun, command_attack_config, default_device,
                                         run_attack)


ATTACK = command_attack_config()  # the command's defaults are AttackRun's and its AttackConfig's
RUN = AttackRun(out="", device="cpu")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=RUN.model, help=f"Hub id or local folder of a supported multimodal model (+ processor); default {RUN.model}, the embedded offline model")
    p.add_argument("--processor", help="processor id/folder if it is not saved with the model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=existing_folder, help="folder of images (attacked with --question)")
    src.add_argument("--offline-eval", choices=OFFLINE_EVAL_TASKS, help="the shipped real-photo eval set (default: vqa)")
    p.add_argument("--limit", type=positive_int, help="attack at most this many examples")
    p.add_argument("--question", default=RUN.question, help="prompt for --images and --offline-eval caption")
    p.add_argument("--prompt-template", help="e.g. 'USER: {image}\\n{question} ASSISTANT:' ({image} = the image token); "
                                              "default: the processor's chat template, else '{image}{question}'")
    p.add_argument("--objective", choices=OBJECTIVES, default=ATTACK.objective)
    p.add_argument("--target-text", help="what the model should say (objective targeted)")
    p.add_argument("--target-image", help="image file whose features the attack pulls towards (objective feature_target)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=ATTACK.protocol,
                   help="adaptive: through each mode's smoothed path (EOT); transfer: the paper's protocol, crafted "
                        "without the defense (the model's own undefended path, or --surrogates) and replayed")
    p.add_argument("--surrogates", help=f"comma-separated surrogate encoders for --protocol transfer: {', '.join(SURROGATES)}, "
                                        "m-attack (M-Attack's three CLIP encoders, from the Hub), synthetic (the three shipped encoders "
                                        "trained offline on the synthetic task), or a transformers "
                                        "encoder's Hub id or folder; several = an ensemble; default: the model's own "
                                        "undefended path (the stronger, grey-box case)")
    p.add_argument("--ensemble-weighting", choices=ENSEMBLE_WEIGHTINGS, default=ATTACK.ensemble_weighting,
                   help="how several --surrogates add up: mean (their mean cosine, M-Attack's; default) or gradient "
                        "(each member's gradient scaled to the same norm per image, so no encoder takes the whole step)")
    p.add_argument("--crop-scale", type=fraction_pair, help="M-Attack random local crops: 'lo,hi' area fractions")
    add_crop_view_arguments(p, ATTACK.crop_views)
    p.add_argument("--norm", choices=NORMS, default=ATTACK.norm)
    p.add_argument("--eps", type=positive_float, default=ATTACK.eps, help="radius in [0,1] pixel space")
    p.add_argument("--steps", type=positive_int, default=ATTACK.steps,
                   help=f"PGD steps (default {COMMAND_ATTACK_STEPS}; the benchmark's adaptive attack runs {ATTACK_STEPS})")
    p.add_argument("--step-size", type=positive_float, help="default 2.5 * eps / steps")
    p.add_argument("--no-random-start", action="store_true")
    p.add_argument("--eot-samples", type=positive_int, default=ATTACK.eot_samples, help="noisy forwards per gradient on smoothed modes")
    p.add_argument("--eot-chunk-size", type=positive_int, help="forwards per backward (memory knob; default all)")
    p.add_argument("--smoothing-samples", type=positive_int, help="noisy copies per smoothed forward while attacking "
                                                                  "(default: --n-samples, i.e. the deployed model)")
    p.add_argument("--seed", type=non_negative_int, default=ATTACK.seed)
    p.add_argument("--modes", default=",".join(RUN.modes), help=f"comma-separated subset of {list(MODES)}")
    add_fs_config_arguments(p, ("sigma", "n_samples"))
    p.add_argument("--booster", type=existing_folder, help="folder of a saved GaussianSmoothnessBooster (mode fs+gsb)")
    p.add_argument("--max-new-tokens", type=positive_int, default=RUN.max_new_tokens)
    p.add_argument("--dtype", choices=DTYPES, default=RUN.dtype)
    p.add_argument("--device", type=device, default=default_device(),
                   help="torch device (default cuda when torch sees a GPU, else cpu)")
    p.add_argument("--out", required=True, help="output folder (adv/ PNGs and results.jsonl); rerun to resume")
    return p


def run_from_args(args: argparse.Namespace) -> AttackRun:
    """The parsed options as an AttackRun (its checks raise ValueError naming the field)."""
    config = AttackConfig(
        norm=args.norm, eps=args.eps, steps=args.steps, step_size=args.step_size,
        random_start=not args.no_random_start, objective=args.objective, target_text=args.target_text,
        protocol=args.protocol, crop_scale=args.crop_scale, crop_views=args.crop_views,
        crop_full_view=args.crop_full_view, ensemble_weighting=args.ensemble_weighting, eot_samples=args.eot_samples,
        eot_chunk_size=args.eot_chunk_size, smoothing_samples=args.smoothing_samples, seed=args.seed,
    )
    surrogates = [s.strip() for s in args.surrogates.split(",") if s.strip()] if args.surrogates else None
    return AttackRun(
        out=args.out, model=args.model, processor=args.processor, images=args.images, offline_eval=args.offline_eval,
        limit=args.limit, question=args.question, prompt_template=args.prompt_template, attack=config,
        target_image=args.target_image, surrogates=surrogates, modes=args.modes, sigma=args.sigma,
        n_samples=args.n_samples, booster=args.booster, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
        device=args.device,
    )


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> AttackRun:
    """The command line as an AttackRun, checked in full before anything is loaded (a bad value: exit 2)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return settings_or_usage_error(parser, lambda: run_from_args(args))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``fs-mllm attack`` and recipes/attack_pipeline.py: parse ``argv`` (default ``sys.argv[1:]``), attack
    what is not in ``--out`` yet, print the summary of this command's rows."""
    run = parse_args(argv, prog)
    report = run_attack(run)
    config = run.attack
    print(f"\n{config.protocol} {config.objective} {config.norm} PGD, eps={config.eps:g}, steps={config.steps}, "
          f"eot_samples={config.eot_samples}; results in {report.results_path}\n")
    print(report.table)
    return 0
