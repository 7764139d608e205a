"""Train a Gaussian Smoothness Booster around a frozen vision encoder: ``fs-mllm train-gsb`` as a script.

    python recipes/train_gsb.py --output-dir runs/gsb_dinov2                     # CPU / one GPU
    accelerate launch recipes/train_gsb.py --output-dir runs/gsb_dinov2 --mixed-precision bf16

The options live in fs_mllm.commands.train_gsb (``--help`` lists them), the logic in fs_mllm.booster (run.py: the run; training.py: both stages).
"""

import sys

from fs_mllm.commands.train_gsb import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
