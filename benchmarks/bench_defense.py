"""What the defense buys on fs-mini-llava: base / FS / FS+GSB x {clean; random-noise control and transfer
at linf 4, 8, 16/255; adaptive l2 0.0625 .. 1.0; adaptive linf 1, 2, 4/255}, one table (fs_mllm.defense,
the demo's code).

Transfer = the paper's protocol (targeted feature matching towards the next held-out image, crafted once
on the undefended model, M-Attack local crops, replayed on every variant); adaptive = PGD through each
variant's smoothed path with EOT, untargeted on the answer; noise = random +-eps signs at each transfer
budget, not an attack: the answers a smoothed variant loses to a fresh Monte-Carlo draw alone. Defaults are
the issue's full size (>= 200 clean questions, 100 attacked images, 300 transfer steps, 20 adaptive steps x 8
EOT samples, certificates at n = 1000): hours on a CPU, so pass smaller counts there and report them.

The run is resumable: every finished row, each variant's clean answers and certificates, the crafted
transfer images and each finished batch of an adaptive attack go to ``--checkpoint`` (default
``<out>.parts``, deleted once the JSON is written) as they exist; rerun the same command after a stop
and only the missing stages are computed, and
``seconds`` in the JSON sums every call. With a named ``--checkpoint`` the variants and budgets may change
between runs (e.g. ``--variants base`` in one call and ``--variants fs+gsb`` in the next); any other
setting, the model's weights or the package version may not. ``--transfer-images`` replays the images
another run's checkpoint crafted, so the defense can be measured at another ``--sigma`` or ``--n-samples``
without crafting them again (its crafting settings are checked against this run's).

    python benchmarks/bench_defense.py [--clean-questions 200] [--attack-images 100] [--transfer-steps 300]
        [--adaptive-steps 20] [--eot-samples 8] [--certify-images 16] [--certify-n 1000]
        [--transfer-linf 4/255,8/255,16/255] [--noise-linf LIKE_TRANSFER] [--adaptive-l2 0.0625,...]
        [--adaptive-linf 1/255,2/255,4/255] [--attack-batch-size 8] [--no-crops] [--crop-views 1] [--crop-full-view]
        [--surrogates m-attack] [--ensemble-weighting mean]
        [--device cpu] [--threads 1] [--out bench_defense.json] [--checkpoint DIR] [--transfer-images OTHER_CHECKPOINT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from fs_mllm.arguments import add_crop_view_arguments, existing_folder, fraction_pair, positive_float, positive_int
from fs_mllm.attacks import ENSEMBLE_WEIGHTINGS
from fs_mllm.config import ATTACK_EOT_SAMPLES, ATTACK_STEPS, CertifyConfig, FSConfig, TRANSFER_STEPS
from fs_mllm.defense import (ADAPTIVE_L2, ADAPTIVE_LINF, TRANSFER_LINF, DefenseSettings, defense_table, evaluate_defense,
                              module_fingerprint, synthetic_items)
from fs_mllm.booster.model import GaussianSmoothnessBooster
from fs_mllm.models import load_mini_llava
from fs_mllm.models.mini_llava import BOOSTER_DIR, IMAGE_SIZE, build_prompt
from fs_mllm.results import SETTINGS_FILE, ResultsFolderError


def budgets(text: str) -> list[float]:
    """Comma-separated budgets in [0,1] pixel units; a/b allowed (16/255); 'none' = no budget."""
    if text.strip().lower() == "none":
        return []
    values = []
    for part in text.split(","):
        top, _, bottom = part.partition("/")
        values.append(float(top) / (float(bottom) if bottom else 1.0))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=positive_float, default=0.25, help="smoothing noise std in [0,1] pixels")
    parser.add_argument("--n-samples", type=positive_int, default=8, help="n0: noisy copies per smoothed forward")
    parser.add_argument("--clean-questions", type=positive_int, default=200, help="held-out questions for clean accuracy")
    parser.add_argument("--attack-images", type=positive_int, default=100,
                        help="held-out images attacked (first question of each) under every budget")
    parser.add_argument("--transfer-steps", type=positive_int, default=TRANSFER_STEPS, help="PGD steps crafting the transfer images")
    parser.add_argument("--transfer-linf", type=budgets, default=list(TRANSFER_LINF),
                        help="transfer linf budgets, comma list, a/b allowed (default 4/255,8/255,16/255; 'none' = skip)")
    parser.add_argument("--noise-linf", type=budgets, default=None,
                        help="budgets of the random-sign-noise control (default: the transfer budgets; 'none' = skip)")
    parser.add_argument("--transfer-step-size", type=positive_float, default=1 / 255, help="transfer PGD step, [0,1] pixels")
    parser.add_argument("--crop-scale", type=fraction_pair, default=(0.5, 1.0),
                        help="M-Attack random local crops: area fraction range 'lo,hi' (default 0.5,1.0)")
    parser.add_argument("--no-crops", action="store_true", help="craft transfer images without local crops")
    add_crop_view_arguments(parser, DefenseSettings.crop_views)
    parser.add_argument("--surrogates", type=lambda text: tuple(v.strip() for v in text.split(",") if v.strip()) or None,
                        default=None, help="transfer crafted on these encoders (comma list, e.g. 'dinov2') instead of "
                                           "the undefended model's own image path")
    parser.add_argument("--ensemble-weighting", choices=ENSEMBLE_WEIGHTINGS, default=DefenseSettings.ensemble_weighting,
                        help="how several --surrogates add up: mean (M-Attack's) or gradient (each member's gradient "
                             "scaled to the same norm per image); see fs_mllm.AttackConfig")
    parser.add_argument("--adaptive-l2", type=budgets, default=list(ADAPTIVE_L2),
                        help="adaptive l2 budgets (default 0.0625,0.125,0.25,0.5,1; 'none' = skip)")
    parser.add_argument("--adaptive-linf", type=budgets, default=list(ADAPTIVE_LINF),
                        help="adaptive linf budgets (default 1/255,2/255,4/255; 'none' = skip)")
    parser.add_argument("--adaptive-steps", type=positive_int, default=ATTACK_STEPS, help="adaptive PGD steps")
    parser.add_argument("--attack-batch-size", type=positive_int, default=8,
                        help="images per adaptive attack call (default 8): memory holds their gradient graphs through the "
                             "language model, about 0.2 GB per image for fs-mini-llava in fp32; a checkpoint keeps each batch")
    parser.add_argument("--eot-samples", type=positive_int, default=ATTACK_EOT_SAMPLES, help="noisy forwards averaged per adaptive step")
    parser.add_argument("--certify-images", type=int, default=16, help="attack images certified per FS variant (0 = none)")
    parser.add_argument("--certify-n", type=positive_int, default=CertifyConfig.n, help="noisy samples per certificate")
    parser.add_argument("--variants", default=None, help="comma list of base,fs,fs+gsb (default all three)")
    parser.add_argument("--booster", type=existing_folder, default=str(BOOSTER_DIR),
                        help="the fs+gsb variant's booster folder (default: fs-mini-llava's shipped one); the JSON records "
                             "its fingerprint")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="bench_defense.json", help="the JSON written at the end")
    parser.add_argument("--checkpoint", default=None,
                        help="resumable run folder: every finished row and the crafted transfer images are kept there; "
                             "rerun the same command to go on after a stop. Default <out>.parts, deleted once the JSON "
                             "is written (a given folder is kept, so later runs can add variants or budgets to it)")
    parser.add_argument("--transfer-images", default=None,
                        help="another run's --checkpoint folder: replay the transfer images it crafted instead of crafting "
                             "them again (checked: same model, attack images, seed and crafting settings; its --sigma, "
                             "--n-samples, variants and clean questions may differ); name --checkpoint in that run, "
                             "since a default <out>.parts folder is deleted once its run completes")
    args = parser.parse_args()
    try:
        settings = DefenseSettings(
            fs=FSConfig(sigma=args.sigma, n_samples=args.n_samples),
            transfer_linf=tuple(args.transfer_linf), transfer_steps=args.transfer_steps,
            noise_linf=None if args.noise_linf is None else tuple(args.noise_linf),
            transfer_step_size=args.transfer_step_size, crop_scale=None if args.no_crops else args.crop_scale,
            crop_views=args.crop_views, crop_full_view=args.crop_full_view,
            adaptive_l2=tuple(args.adaptive_l2), adaptive_linf=tuple(args.adaptive_linf),
            adaptive_steps=args.adaptive_steps, eot_samples=args.eot_samples, attack_batch_size=args.attack_batch_size,
            certify_images=args.certify_images, certify_n=args.certify_n, surrogates=args.surrogates,
            ensemble_weighting=args.ensemble_weighting,
            **({"variants": args.variants} if args.variants else {}),
        )
    except ValueError as error:
        parser.error(str(error))
    if args.checkpoint is not None and not args.checkpoint.strip():
        parser.error("--checkpoint must name a folder (leave it out for the default <out>.parts)")
    if args.transfer_images is not None and not (Path(args.transfer_images) / SETTINGS_FILE).is_file():
        parser.error(f"--transfer-images {args.transfer_images!r} must name another run's --checkpoint folder (one holding "
                     f"{SETTINGS_FILE}); a default <out>.parts folder is deleted once its run completes, so name "
                     "--checkpoint in the run whose images you want to replay")
    checkpoint = Path(args.checkpoint if args.checkpoint is not None else args.out + ".parts")
    if checkpoint.exists() and not checkpoint.is_dir():
        parser.error(f"--checkpoint {checkpoint} is a file; name a folder")
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated call still records its time (finally below)
    start = time.perf_counter()
    model, processor = load_mini_llava(device=args.device)
    booster = GaussianSmoothnessBooster.from_pretrained(args.booster).eval().to(args.device)
    clean_items, n_images = [], 0
    while len(clean_items) < args.clean_questions:  # every question of each image, until enough
        n_images += 1
        clean_items = synthetic_items(n_images, IMAGE_SIZE, build_prompt)
    clean_items = clean_items[:args.clean_questions]
    attack_items = synthetic_items(args.attack_images, IMAGE_SIZE, build_prompt, first_question_only=True)
    calls_path = checkpoint / "calls.jsonl"  # every call's time, so a resumed run reports the whole cost
    settings_path = checkpoint / SETTINGS_FILE
    claimed_by = settings_path.read_bytes() if settings_path.exists() else None
    finished = refused = False
    try:
        rows = evaluate_defense(model, processor, clean_items, attack_items, settings, booster=booster, checkpoint=checkpoint,
                                transfer_images=args.transfer_images)
        finished = True
    except ResultsFolderError as error:  # another run's folder (or one in use): leave it untouched
        refused = True
        parser.error(str(error))
    finally:
        if not refused and checkpoint.is_dir():
            if claimed_by is not None and settings_path.exists() and settings_path.read_bytes() != claimed_by:
                calls_path.unlink(missing_ok=True)  # the folder held no results and another run claimed it: a new run
            with open(calls_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"seconds": time.perf_counter() - start, "device": args.device, "finished": finished,
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    **({"transfer_images": args.transfer_images} if args.transfer_images else {})}) + "\n")
    calls = [json.loads(line) for line in calls_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    seconds = sum(call["seconds"] for call in calls)
    table = defense_table(rows)
    print(table)
    print(f"\n{len(clean_items)} clean questions, {len(attack_items)} attacked images, {seconds:.0f} s on "
          f"{args.device} ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
          + (f" over {len(calls)} calls" if len(calls) > 1 else ""))
    result = {"command": " ".join(["python", "benchmarks/bench_defense.py", *map(shlex.quote, sys.argv[1:])]),
              "settings": settings.to_dict(), "clean_questions": len(clean_items), "attack_images": len(attack_items),
              "device": args.device, "seconds": seconds, "calls": calls, "rows": rows, "table": table,
              "booster": module_fingerprint(booster) if "fs+gsb" in settings.variants else None,
              # images replayed from another run: their crafting time is that run's, not in ``seconds``
              "transfer_images": args.transfer_images}
    temporary = Path(args.out + ".tmp")
    temporary.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(temporary, args.out)
    if args.checkpoint is None:
        shutil.rmtree(checkpoint)  # the run is complete: a rerun starts afresh (and sees any new code or weights)


if __name__ == "__main__":
    main()
