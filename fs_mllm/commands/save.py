"""``fs-mllm save``: load a model, patch it (with a booster) and save it as a loadable folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..hub.card import RESULT_KEYS, render_results
from ..hub.io import save_pretrained


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from ..arguments import add_fs_config_arguments

    p = argparse.ArgumentParser(
        prog=prog or "fs-mllm save",
        description="Patch a model with feature-space smoothing (and a booster) and save it as a loadable folder with "
                    "fs_config.json and a model card; fs_mllm.from_pretrained(folder) loads it back.")
    p.add_argument("--model", required=True, help="model to patch: 'fs-mini-llava', a Hub id, a local folder, or a saved fs folder/repo id")
    p.add_argument("--output-dir", required=True, help="folder to write (fs_config.json, booster, processor files, README.md)")
    add_fs_config_arguments(p, ("sigma", "n_samples", "seed", "chunk_size", "normalize", "alpha", "method"))
    p.add_argument("--booster", default=None, help="folder of a trained GaussianSmoothnessBooster (gsb.safetensors) to save with the patch")
    p.add_argument("--include-weights", action="store_true", help="save the base weights too (for models not on the Hub)")
    p.add_argument("--base-model", default=None, help="Hub repo id of the base model (default: the id it was loaded by)")
    p.add_argument("--revision", default=None, help="commit of the base model to pin (default: the one in the HF cache)")
    p.add_argument("--results", default=None, help=f"JSON file of measured figures for the card (keys among {', '.join(RESULT_KEYS)})")
    p.add_argument("--name", default=None, help="title of the model card (default: the folder name)")
    p.add_argument("--license", default=None, help="licence identifier for the card metadata (e.g. apache-2.0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype to load the model in")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Path:
    """``fs-mllm save``: load (``--model``), patch, save; prints and returns the folder."""
    from ..arguments import fs_config_from_args, settings_or_usage_error
    from ..booster.model import GaussianSmoothnessBooster
    from ..models.loading import load_model
    from ..patching import patch_model

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    results = None
    if args.results is not None:
        path = Path(args.results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(f"fs-mllm save: --results {path}: {error}") from None
        render_results(results)  # refuse a bad file before loading the model
    config = settings_or_usage_error(parser, lambda: fs_config_from_args(args))
    booster = GaussianSmoothnessBooster.from_pretrained(args.booster) if args.booster else None
    model, processor = load_model(args.model, dtype=args.dtype)
    patch_model(model, config=config, booster=booster, processor=processor)
    folder = save_pretrained(model, args.output_dir, processor=processor, base_model=args.base_model, revision=args.revision,
                             include_weights=args.include_weights, results=results, name=args.name, license=args.license)
    print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    return folder
