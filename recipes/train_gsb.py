"""Train a Gaussian Smoothness Booster around a frozen vision encoder: ``fs-mllm train-gsb`` as a script.

    python recipes/train_gsb.py --output-dir runs/gsb_dinov2                     # CPU / one GPU
    accelerate launch recipes/train_gsb.py --output-dir runs/gsb_dinov2 --mixed-precision bf16

The options and the logic live in fs_mllm.gsb_training (``--help`` lists them).
"""

import sys

from fs_mllm.gsb_training import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
