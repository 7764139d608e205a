"""fs_mllm: certified robustness for Hugging Face multimodal LLMs through feature-space smoothing."""

from .answer_certify import AnswerCertificate, certify_answer
from .attacks import AttackConfig, AttackResult, attack
from .certify import Certificate, ModelCertificate, PredictionCertificate, certify_features, certify_model, certify_prediction
from .certify import certify_zero_shot
from .config import FSConfig
from .gsb import GaussianSmoothnessBooster, GSBConfig, boosted_encoder
from .hub import from_pretrained, push_to_hub, save_pretrained
from .patching import get_fs_state, is_patched, patch_model, unpatch_model
from .smoothing import smooth_features
from .stats import certified_radius, clopper_pearson_lower, fcsb, score_lower_bound

__version__ = "0.1.0"

__all__ = [
    "AnswerCertificate",
    "AttackConfig",
    "AttackResult",
    "attack",
    "boosted_encoder",
    "Certificate",
    "FSConfig",
    "GSBConfig",
    "GaussianSmoothnessBooster",
    "ModelCertificate",
    "PredictionCertificate",
    "certified_radius",
    "certify_answer",
    "certify_features",
    "certify_model",
    "certify_prediction",
    "certify_zero_shot",
    "clopper_pearson_lower",
    "fcsb",
    "from_pretrained",
    "get_fs_state",
    "is_patched",
    "patch_model",
    "push_to_hub",
    "save_pretrained",
    "score_lower_bound",
    "smooth_features",
    "unpatch_model",
]
