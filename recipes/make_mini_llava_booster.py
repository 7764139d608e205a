"""Derive a pixel-space booster for fs-mini-llava from the shipped DINOv2 booster.

fs-mini-llava's vision tower is the same DINOv2 ViT-S/14 at 112 px that the shipped booster's denoiser
was trained through (feature consistency on its patch tokens), so the denoiser carries over. The
mapper does not: it was trained on DINOv2's 384-d patch tokens, while the features that feed
fs-mini-llava's decoder are the projector's 576-d outputs. This keeps the denoiser only, declared for
the decoder-facing feature size, and saves it (safetensors + JSON).

    python recipes/make_mini_llava_booster.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path


from fs_mllm.gsb import GaussianSmoothnessBooster, GSBConfig  # noqa: E402
from fs_mllm.models.mini_llava import BOOSTER_DIR  # noqa: E402

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
    args = parser.parse_args(argv)
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
