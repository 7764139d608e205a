"""``fs-mllm certify`` without ``--answers``: certify the features feeding a model's decoder over a folder of
images (or the project's offline photos), and write the certificates, the certified curve and a report.

Why it is built this way: a feature certificate is one Monte-Carlo pass per image (seconds to minutes), so a
run is short and is not resumed; instead nothing is written until every image is certified, so a failure
midway leaves no folder that looks finished. ``run_certify_features(FeatureCertifySettings(...), folder)`` is
the Python API of the command, which only parses into the settings.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..arguments import check_image_size, check_int
from ..config import CertifyConfig, FSConfig
from ..models.loading import DEFAULT_MODEL

__all__ = ["CERTIFICATE_MEANING", "DEFAULT_OUTPUT_DIR", "FeatureCertifySettings", "certify_images", "run_certify_features"]

DEFAULT_OUTPUT_DIR = "fs_mllm_outputs/certify"
DEFAULT_RADII = (0.0625, 0.125, 0.25)
CERTIFICATE_MEANING = (
    "Each FCSB@r is a lower bound on cos(F(x'), F(x)) for every x' within l2 distance r of the image "
    "(in [0,1] pixel space), for the exact smoothed encoder F at sigma={sigma}; it holds per image with "
    "probability >= 1 - {alpha} over the certification noise. -1 means no guarantee."
)


@dataclass
class FeatureCertifySettings:
    """One feature certification: which model and images, the smoothing, and the certificate's statistics.

    Every value is checked on construction (a ValueError naming the field), before any model loads. The
    smoothing fields are FSConfig's and the statistics CertifyConfig's, with their defaults.

    Attributes:
        model: "fs-mini-llava" (the embedded offline LLaVA) or a model id / local folder.
        images: a folder of images, or None for the project's real offline photos.
        limit: certify only the first this many images; None: all.
        size: input resolution in pixels; None: the processor's.
        sigma: smoothing noise std in [0,1] pixel space.
        n: Monte-Carlo samples per image, >= 2.
        alpha: failure probability of each certificate, in (0, 1).
        method: lower confidence bound on the robustness score (fs_mllm.stats).
        seed: seed of the certification noise.
        chunk_size: noisy copies per encoder call (a memory knob); None: the default.
        normalize: "global" (one unit vector per image) or "token" (each visual token on its own).
        radii: l2 radii in [0,1] pixel space at which the report states FCSB.
        booster: folder of a trained GaussianSmoothnessBooster, or None (FS alone).
    """

    model: str = DEFAULT_MODEL
    images: Optional[str] = None
    limit: Optional[int] = None
    size: Optional[int] = None
    sigma: float = FSConfig.sigma
    n: int = CertifyConfig.n
    alpha: float = CertifyConfig.alpha
    method: str = CertifyConfig.method
    seed: int = FSConfig.seed
    chunk_size: Optional[int] = FSConfig.chunk_size
    normalize: str = FSConfig.normalize
    radii: tuple[float, ...] = DEFAULT_RADII
    booster: Optional[str] = None

    def __post_init__(self) -> None:
        from ..config import check_n

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a model id or a local folder (a non-empty string), got {self.model!r}")
        fs = self.fs_config()  # sigma, alpha, method, seed, chunk_size and normalize through FSConfig's own checks
        self.sigma, self.alpha, self.method, self.seed = fs.sigma, fs.alpha, fs.method, fs.seed
        self.n = check_n(self.n)
        if self.limit is not None:
            check_int(self.limit, "limit")
        if self.size is not None:
            check_image_size(self.size, "size")
        try:
            radii = () if isinstance(self.radii, (str, bytes)) else tuple(self.radii)
        except TypeError:
            radii = ()
        if not radii or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r < float("inf") for r in radii):
            raise ValueError(f"radii must be a non-empty list of l2 radii >= 0 in [0,1] pixel space, got {self.radii!r}")
        self.radii = tuple(float(r) for r in radii)
        for name in ("images", "booster"):
            folder = getattr(self, name)
            if folder is not None and (not isinstance(folder, (str, os.PathLike)) or not Path(folder).is_dir()):
                raise ValueError(f"{name} must be an existing folder, got {folder!r}")

    def fs_config(self) -> FSConfig:
        """The smoothing these settings certify, as the FSConfig a patched model carries."""
        return FSConfig(sigma=self.sigma, alpha=self.alpha, method=self.method, seed=self.seed,
                        chunk_size=self.chunk_size, normalize=self.normalize)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["radii"] = list(self.radii)
        return data


def certify_images(model: Any, images01: Any, settings: FeatureCertifySettings, booster: Any = None,
                   processor: Any = None) -> list:
    """Certificates of the features feeding the decoder of ``model`` (B, 3, H, W) [0,1] ``images01``, smoothed as
    ``settings`` say (booster optional); a model that is not patched is patched for the call and unpatched after."""
    from ..certify import certify_model
    from ..patching import is_patched, patch_model, unpatch_model

    was_patched = is_patched(model)
    if not was_patched:
        patch_model(model, sigma=settings.sigma, booster=booster, processor=processor)
    try:
        return certify_model(model, images01, n=settings.n, alpha=settings.alpha, method=settings.method,
                             seed=settings.seed, chunk_size=settings.chunk_size, normalize=settings.normalize)
    finally:
        if not was_patched:
            unpatch_model(model)


def run_certify_features(settings: FeatureCertifySettings, output_dir: str | Path = DEFAULT_OUTPUT_DIR,
                         progress: bool = True) -> dict[str, Any]:
    """Certify every image, then write ``certificates.jsonl``, ``certified_curve.png``, ``summary.json`` and
    ``report.md`` into ``output_dir`` (nothing is written when a step fails).

    Returns:
        {"certificates": one ModelCertificate per image, "curve": the certified curve, "markdown": the table,
        "table": its rows}.

    Raises:
        ValueError: an unreadable image or booster, or a processor that states no input resolution.
    """
    import torch
    from tqdm.auto import tqdm

    from ..booster.model import GaussianSmoothnessBooster
    from ..image_io import processor_size, to_tensor01
    from ..models.loading import load_model
    from ..results import durable_replace, write_report
    from . import certified_curve, plot_certified_curve, summary_table
    from .datasets import read_images

    booster = None if settings.booster is None else GaussianSmoothnessBooster.from_pretrained(settings.booster)
    pictures, names = read_images(settings.images, settings.limit)  # the cheap checks before the model loads
    model, processor = load_model(settings.model)
    size = settings.size or processor_size(processor)
    if not size:
        raise ValueError("size: could not read the input resolution from the processor; pass it (--size)")
    images = torch.stack([to_tensor01(picture, size) for picture in pictures])
    certificates = []
    for i in tqdm(range(len(names)), desc="certifying", unit="image", disable=not progress):
        certificates += certify_images(model, images[i:i + 1], settings, booster, processor)

    records, rows = [], []
    for name, cert in zip(names, certificates):
        fcsb = {r: float(cert.fcsb(r)) for r in settings.radii}
        records.append({"image": name, **{k: v for k, v in cert.to_dict().items() if not k.startswith("token_")},
                        **{f"fcsb@{r:g}": b for r, b in fcsb.items()}})
        rows.append({"image": name, "S mean": cert.score_mean, "S lower": cert.score_lower,
                     **{f"FCSB@{r:g}": b for r, b in fcsb.items()}})
    curve = certified_curve([c.score_lower for c in certificates], settings.sigma)
    markdown, table = summary_table(rows)

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    certificates_path = out_dir / "certificates.jsonl"
    temporary = out_dir / "certificates.jsonl.tmp"
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    durable_replace(temporary, certificates_path)
    plot = plot_certified_curve({"FS" if booster is None else "FS+GSB": curve}, out_dir / "certified_curve.png",
                                threshold=0.5, title=f"{settings.model}, sigma={settings.sigma}, n={settings.n}, "
                                                     f"alpha={settings.alpha}")
    stored = {"command": "certify", **settings.to_dict(), "output_dir": str(output_dir)}
    (out_dir / "summary.json").write_text(json.dumps({"settings": stored, "table": table, "curve": curve}, indent=2,
                                                     default=str), encoding="utf-8")
    write_report(out_dir, f"Certified features of {settings.model}", markdown,
                 [f"![certified curve]({Path(plot).name})", CERTIFICATE_MEANING.format(sigma=settings.sigma,
                                                                                      alpha=settings.alpha)])
    return {"certificates": certificates, "curve": curve, "markdown": markdown, "table": table}
