"""The Gaussian Smoothness Booster (DESIGN section 3): the model and its training, one module per part.

- ``model``: GSBConfig, the denoiser and mapper, GaussianSmoothnessBooster (save/load), boosted_encoder;
- ``data``: the training images (offline photos, folders, ``datasets``) and their seeded random crops;
- ``encoders``: the frozen encoder a booster is trained around;
- ``losses``: the training losses;
- ``checkpoint``: atomic, resumable checkpoints (safetensors + JSON);
- ``training``: GSBTrainConfig and train_gsb, the denoiser stage then the mapper stage;
- ``run``: BoosterTrainingRun and run_booster_training, what ``fs-mllm train-gsb`` runs;
- ``through_lm``: a booster stage trained through the frozen language model (``fs-mllm train-mapper``).

Only the model is imported here: loading a booster needs none of the training code.
"""

from .model import GaussianSmoothnessBooster, GSBConfig, boosted_encoder

__all__ = ["GaussianSmoothnessBooster", "GSBConfig", "boosted_encoder"]
