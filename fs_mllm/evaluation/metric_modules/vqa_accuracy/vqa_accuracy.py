"""VQAv2 accuracy (official answer normalisation, 10-choose-9 averaging) as an `evaluate` metric.

Load it offline with ``evaluate.load(path_to_this_folder)`` or ``fs_mllm.evaluation.load_metric("vqa_accuracy")``.
The computation lives in ``fs_mllm.evaluation.vqa``; this module only adapts it to `evaluate`.
"""

import evaluate
from fs_mllm.evaluation import text_metric_info
from fs_mllm.evaluation.vqa import vqa_scores

_DESCRIPTION = """
VQA accuracy as computed by the official VQAv2 evaluation: answers are normalised (punctuation,
number words to digits, articles, contractions) and a prediction scores min(#matching humans / 3, 1)
averaged over the leave-one-out subsets of the (usually 10) human answers.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one predicted answer per question.
    references (list of list of str): the human answers for each question (usually 10).
Returns:
    accuracy (float): mean VQA accuracy in [0, 1].
    scores (list of float): per-question accuracy, only with return_scores=True.
Examples:
    >>> metric = evaluate.load("path/to/vqa_accuracy")
    >>> metric.compute(predictions=["two"], references=[["2"] * 10])
    {'accuracy': 1.0}
"""

_CITATION = """
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """Official VQAv2 accuracy."""

    def _info(self):
        return text_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://github.com/GT-Vision-Lab/VQA")

    def _compute(self, predictions, references, return_scores=False):
        scores = vqa_scores(predictions, references)
        result = {"accuracy": sum(scores) / len(scores)}
        if return_scores:
            result["scores"] = scores
        return result
