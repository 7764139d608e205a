"""Derive a pixel-space booster for fs-mini-llava from a DINOv2 booster, and write its training images.

fs-mini-llava's vision tower is the same DINOv2 ViT-S/14 at 112 px that the shipped DINOv2 booster's
denoiser was trained through (feature consistency on its patch tokens), so the denoiser carries over.
The mapper does not: it was trained on DINOv2's 384-d patch tokens, while the features that feed
fs-mini-llava's decoder are the projector's 576-d outputs. This keeps the denoiser only, declared for
the decoder-facing feature size, and saves it (safetensors + JSON).

    python recipes/make_mini_llava_booster.py [--source DIR] [--out DIR]
    python recipes/make_mini_llava_booster.py --write-train-images DIR [--synthetic 800]

The shipped ``weights/gsb_mini_llava_s025`` was made in three steps (each run's command, settings and
times are recorded in its ``gsb_config.json``):

1. a folder of 800 synthetic *training-split* scenes (never the held-out split) plus the DINOv2
   booster's 19 training photos: ``--write-train-images runs/mini_train``;
2. the DINOv2 booster's denoiser fine-tuned on that folder (MSE + feature consistency through DINOv2,
   ``fs-mllm train-gsb --images runs/mini_train --init-from fs_mllm/weights/gsb_dinov2_s025
   --mapper-steps 0 ...``), then declared for fs-mini-llava by this script (``--source``);
3. the denoiser fine-tuned through the frozen tower, projector and language model on answers of noisy
   training scenes (``fs-mllm train-mapper --stage denoiser --init ...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from fs_mllm.arguments import positive_int
from fs_mllm.booster.model import GaussianSmoothnessBooster, GSBConfig
from fs_mllm.booster.through_lm import write_train_images
from fs_mllm.models.mini_llava import BOOSTER_DIR

WEIGHTS = Path(__file__).resolve().parents[1] / "fs_mllm" / "weights"


def denoiser_only(source: GaussianSmoothnessBooster, feature_dim: int, encoder_id: str) -> GaussianSmoothnessBooster:
    """A booster with ``source``'s denoiser and no mapper, declared for ``feature_dim``-d decoder features."""
    if source.denoiser is None:
        raise ValueError("source booster has no denoiser to carry over")
    data = source.config.to_dict()
    data.update(feature_dim=feature_dim, use_mapper=False, encoder_id=encoder_id)
    data["extra"] = {**data.get("extra", {}), "derived_from": source.config.encoder_id,
                     "note": "denoiser trained through DINOv2 ViT-S/14 patch tokens at 112 px; mapper dropped"}
    booster = GaussianSmoothnessBooster(GSBConfig.from_dict(data))
    booster.denoiser.load_state_dict(source.denoiser.state_dict())
    return booster.eval()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(WEIGHTS / "gsb_dinov2_s025"), help="booster folder to take the denoiser from")
    parser.add_argument("--out", default=str(BOOSTER_DIR), help="where to save the derived booster")
    parser.add_argument("--write-train-images", metavar="DIR", help="write the booster's training images to DIR and stop")
    parser.add_argument("--synthetic", type=positive_int, default=800, help="synthetic training scenes to write (default 800)")
    args = parser.parse_args(argv)
    if args.write_train_images:
        folder = write_train_images(args.write_train_images, args.synthetic)
        print(f"wrote {args.synthetic} synthetic scenes and the DINOv2 booster's training photos to {folder}")
        return folder
    from fs_mllm.models import load_mini_llava
    from fs_mllm.adapters import get_adapter

    model, _ = load_mini_llava()
    feature_dim = get_adapter(model).feature_dim(model)
    booster = denoiser_only(GaussianSmoothnessBooster.from_pretrained(args.source), feature_dim, "fs-mini-llava/projector")
    out = booster.save_pretrained(args.out)
    print(f"saved denoiser-only booster for fs-mini-llava ({feature_dim}-d features) to {out}")
    return out


if __name__ == "__main__":
    main()
