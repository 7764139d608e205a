"""COCO caption metrics (CIDEr, BLEU-1..4, ROUGE-L, METEOR) as an `evaluate` metric, offline.

Load it with ``evaluate.load(path_to_this_folder)`` or ``fs_mllm.evaluation.load_metric("robust_caption")``.
Uses pycocoevalcap (the COCO reference implementation); METEOR and the PTB tokenizer need Java and
are replaced/skipped with a message when it is missing; SPICE is always skipped (no offline models).
The computation lives in ``fs_mllm.evaluation.caption``.
"""

import evaluate
from fs_mllm.evaluation import text_metric_info
from fs_mllm.evaluation.caption import caption_metrics

_DESCRIPTION = """
Corpus-level COCO captioning metrics through pycocoevalcap, usable offline. Used for clean and
adversarial captions alike (compute once per setting and compare), hence "robust_caption".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one generated caption per image.
    references (list of list of str): the reference captions of each image.
    meteor (bool or None): compute METEOR (needs Java, ~10 s start-up); None = when Java is present.
    tokenizer (str): "auto" (PTB when Java works), "ptb" or "simple".
Returns:
    dict with CIDEr, BLEU-1..BLEU-4, ROUGE-L, METEOR (None when skipped), SPICE (None),
    skipped ({metric: reason}), tokenizer and num_images.
Examples:
    >>> metric = evaluate.load("path/to/robust_caption")
    >>> metric.compute(predictions=["a cat on a mat"], references=[["a cat on a mat"]], meteor=False)["BLEU-1"]
    1.0
"""

_CITATION = """
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Dollar, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RobustCaption(evaluate.Metric):
    """COCO caption metrics via pycocoevalcap."""

    def _info(self):
        return text_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://github.com/salaniz/pycocoevalcap")

    def _compute(self, predictions, references, meteor=None, tokenizer="auto"):
        return caption_metrics(predictions, references, meteor=meteor, tokenizer=tokenizer)
