"""fs_mllm: certified robustness for Hugging Face multimodal LLMs through feature-space smoothing."""

from .answer_certify import AnswerCertificate, certify_answer
from .attacks import AttackConfig, AttackResult, attack
from .certify import Certificate, ModelCertificate, PredictionCertificate, certify_features, certify_model, certify_prediction
from .certify import certify_zero_shot
from .config import CertifyConfig, FSConfig
from .booster.model import GaussianSmoothnessBooster, GSBConfig, boosted_encoder
from .hub import from_pretrained, patch_from_saved, push_to_hub, save_pretrained
from .hub.io import register_local_repo as _register_local_repo
from .models import MINI_LLAVA_REPO as _MINI_LLAVA_REPO, provide_mini_llava as _provide_mini_llava
from .patching import get_fs_state, is_patched, patch_model, unpatch_model
from .smoothing import smooth_features
from .stats import certified_radius, clopper_pearson_lower, fcsb, score_lower_bound

from .version import __version__

_register_local_repo(_MINI_LLAVA_REPO, _provide_mini_llava)  # the embedded model resolves by repo id, offline

__all__ = [
    "AnswerCertificate",
    "AttackConfig",
    "AttackResult",
    "attack",
    "boosted_encoder",
    "Certificate",
    "CertifyConfig",
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
    "patch_from_saved",
    "patch_model",
    "push_to_hub",
    "save_pretrained",
    "score_lower_bound",
    "smooth_features",
    "unpatch_model",
]
