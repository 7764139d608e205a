"""The ``fs-mllm`` command: demo, certify, attack, eval and train-gsb, each a thin layer.

``demo`` and ``certify`` live here (they only call the library); ``attack``, ``eval`` and
``train-gsb`` hand their arguments to the recipe scripts in ``recipes/`` (one argument parser each,
shared by the script and the command), so the command and the scripts never drift apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import demo as demo_module
from .demo import run_demo
from .image_io import to_tensor01
from .models.loading import DEFAULT_MODEL, load_model

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = {"attack": "attack_pipeline", "eval-vqa": "eval_vqa", "eval-caption": "eval_caption", "train-gsb": "train_gsb"}


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def processor_size(processor: Any) -> int:
    """Square input resolution of the processor (crop size, else size)."""
    image_processor = getattr(processor, "image_processor", processor)
    for key in ("crop_size", "size"):
        size = getattr(image_processor, key, None)
        if size is not None and not isinstance(size, int):
            size = dict(size).get("height") or dict(size).get("shortest_edge")
        if size:
            return int(size)
    raise ValueError("could not read the input resolution from the processor; pass --size")


def load_images(folder: Optional[str], size: int, limit: Optional[int] = None):
    """[0,1] images (B, 3, size, size) and their names: a folder of images, or the project's real offline photos."""
    import torch
    from PIL import Image

    if folder is None:
        from .evaluation import load_offline_eval

        photos = load_offline_eval("caption")
        names = [f"offline-photo-{i}" for i in photos["image_id"]]
        images = list(photos["image"])
    else:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        if not paths:
            raise ValueError(f"--images: no .png/.jpg/.jpeg/.bmp/.webp files in {folder}")
        names = [p.name for p in paths]
        images = [Image.open(p) for p in paths]
    if limit is not None:
        names, images = names[:limit], images[:limit]
    return torch.stack([to_tensor01(image, size) for image in images]), names


def write_report(out_dir: Path, title: str, markdown_table: str, extra: Sequence[str] = ()) -> Path:
    path = out_dir / "report.md"
    path.write_text("\n\n".join([f"# {title}", markdown_table, *extra]) + "\n", encoding="utf-8")
    return path


def positive_radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"radii must be comma-separated numbers, got {text!r}") from None
    if not radii or any(r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be non-negative l2 radii, got {text!r}")
    return radii


# ---------------------------------------------------------------------------------------------
# certify
# ---------------------------------------------------------------------------------------------

def certify_images(model, images01, sigma: float, n: int, alpha: float, method: str, booster=None, processor=None):
    """Certificates of the features feeding the decoder of ``model`` smoothed at ``sigma`` (booster optional)."""
    from .patching import certify_model, is_patched, patch_model, unpatch_model

    was_patched = is_patched(model)
    if not was_patched:
        patch_model(model, sigma=sigma, booster=booster, processor=processor)
    try:
        return certify_model(model, images01, n=n, alpha=alpha, method=method)
    finally:
        if not was_patched:
            unpatch_model(model)


def run_certify(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from .evaluation import certified_curve, plot_certified_curve, summary_table

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(args.model)
    booster = load_booster(args.booster)
    size = args.size or processor_size(processor)
    images, names = load_images(args.images, size, args.limit)
    certificates = []
    for i in tqdm(range(len(names)), desc="certifying", unit="image"):
        certificates += certify_images(model, images[i:i + 1], args.sigma, args.n, args.alpha, args.method, booster, processor)
    rows = []
    with open(out_dir / "certificates.jsonl", "w", encoding="utf-8") as f:
        for name, cert in zip(names, certificates):
            record = {"image": name, **{k: v for k, v in cert.to_dict().items() if not k.startswith("token_")}}
            record.update({f"fcsb@{r:g}": float(cert.fcsb(r)) for r in args.radii})
            f.write(json.dumps(record) + "\n")
            rows.append({"image": name, "S mean": cert.score_mean, "S lower": cert.score_lower,
                         **{f"FCSB@{r:g}": float(cert.fcsb(r)) for r in args.radii}})
    curve = certified_curve([c.score_lower for c in certificates], args.sigma)
    plot = plot_certified_curve({"FS" if booster is None else "FS+GSB": curve}, out_dir / "certified_curve.png", threshold=0.5,
                                title=f"{args.model}, sigma={args.sigma}, n={args.n}, alpha={args.alpha}")
    markdown, table = summary_table(rows)
    (out_dir / "summary.json").write_text(json.dumps({"settings": vars(args), "table": table, "curve": curve}, indent=2, default=str))
    write_report(out_dir, f"Certified features of {args.model}", markdown, [f"![certified curve]({Path(plot).name})",
                 CERTIFICATE_MEANING.format(sigma=args.sigma, alpha=args.alpha)])
    print(markdown)
    print(f"\nwrote {out_dir}/certificates.jsonl, certified_curve.png, report.md")
    return {"certificates": certificates, "curve": curve}


CERTIFICATE_MEANING = (
    "Each FCSB@r is a lower bound on cos(F(x'), F(x)) for every x' within l2 distance r of the image "
    "(in [0,1] pixel space), for the exact smoothed encoder F at sigma={sigma}; it holds per image with "
    "probability >= 1 - {alpha} over the certification noise. -1 means no guarantee."
)


def load_booster(path: Optional[str]):
    if path is None:
        return None
    from .gsb import GaussianSmoothnessBooster

    return GaussianSmoothnessBooster.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def load_recipe(name: str):
    """Import a recipe script from ``recipes/`` (present in a source checkout / editable install)."""
    path = RECIPES_DIR / f"{RECIPES[name]}.py"
    if not path.exists():
        raise SystemExit(f"fs-mllm {name}: recipe {path} not found; install fs_mllm from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"fs_mllm_recipe_{RECIPES[name]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fs-mllm",
        description="Certified robustness for multimodal LLMs through feature-space smoothing (FS + FCSB + GSB).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="base / FS / FS+GSB on the embedded offline model, transfer and adaptive attacks (minutes on a CPU)",
                          description=demo_module.DESCRIPTION)
    demo_module.add_arguments(demo)
    demo.set_defaults(run=run_demo)

    cert = sub.add_parser("certify", help="certify the features feeding the decoder, per image (FCSB curve + report)",
                          description="Certify the smoothed image features of a model on a folder of images "
                                      "(default: the real offline photos).")
    cert.add_argument("--model", default=DEFAULT_MODEL, help=f"model id or local folder (default {DEFAULT_MODEL})")
    cert.add_argument("--images", default=None, help="folder of images (default: the project's real offline photos)")
    cert.add_argument("--limit", type=int, default=None, help="certify only the first N images")
    cert.add_argument("--size", type=int, default=None, help="input resolution (default: the processor's)")
    cert.add_argument("--sigma", type=float, default=0.25, help="noise std in [0,1] pixel space (default 0.25)")
    cert.add_argument("--n", type=int, default=1000, help="Monte-Carlo samples per image (default 1000)")
    cert.add_argument("--alpha", type=float, default=0.001, help="failure probability per certificate (default 0.001)")
    cert.add_argument("--method", default="bernstein", choices=["hoeffding", "bernstein", "betting"],
                      help="lower confidence bound on the robustness score (default bernstein)")
    cert.add_argument("--radii", type=positive_radii, default=[0.0625, 0.125, 0.25],
                      help="comma-separated l2 radii to report FCSB at (default 0.0625,0.125,0.25)")
    cert.add_argument("--booster", default=None, help="folder of a trained GaussianSmoothnessBooster (gsb.safetensors)")
    cert.add_argument("--output-dir", default="fs_mllm_outputs/certify", help="where results go")
    cert.set_defaults(run=run_certify)

    for name, recipe_help in (("attack", "PGD attacks on the full pipeline (recipes/attack_pipeline.py)"),
                              ("eval-vqa", "VQA robustness evaluation (recipes/eval_vqa.py)"),
                              ("eval-caption", "captioning robustness evaluation (recipes/eval_caption.py)"),
                              ("train-gsb", "train a Gaussian Smoothness Booster (recipes/train_gsb.py)")):
        recipe = sub.add_parser(name, help=recipe_help, add_help=False,
                                description=f"{recipe_help}; `fs-mllm {name} --help` lists the recipe's options.")
        recipe.set_defaults(recipe=name)
    eval_alias = sub.add_parser("eval", help="alias: `fs-mllm eval vqa|caption ...`", add_help=False)
    eval_alias.set_defaults(recipe="eval")

    # `save` hands its arguments to fs_mllm.hub.main (one parser, in the module that saves)
    save = sub.add_parser("save", help="patch a model (+ booster) and save it with fs_config.json and a model card",
                          add_help=False, description="`fs-mllm save --help` lists the options.")
    save.set_defaults(recipe="save")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    recipe = getattr(args, "recipe", None)
    if recipe is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.run(args)
    if recipe == "eval":
        if not rest or rest[0] not in ("vqa", "caption"):
            parser.error("usage: fs-mllm eval {vqa,caption} [options]")
        recipe, rest = f"eval-{rest[0]}", rest[1:]
    if recipe == "save":
        from .hub import main as save_main

        return save_main(rest)
    return load_recipe(recipe).main(rest)


def console_main() -> int:
    """The ``fs-mllm`` console script: exit status 0 on success.

    Why: ``main`` returns the run's results for Python callers; a console script's return value is
    its exit status, and a returned dict would exit 1 and be printed to stderr.
    """
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
