"""Accuracy, as an `evaluate` module shipped with Fornax."""
import evaluate

from backend.data import counts
from backend.scoring.metric_info import LABEL_FEATURES
from backend.scoring.metric_info import SKLEARN_CITATION as _CITATION

_DESCRIPTION = """Accuracy is the share of predictions equal to their reference label: (TP + TN) / all in the
binary case, correct / all for any number of classes. Labels may be integers or strings. Range 0-1."""


_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int or str): predicted labels.
    references (list of int or str): true labels, as many as predictions.
Returns:
    accuracy (float, 0-1).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=LABEL_FEATURES,
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#accuracy-score"],
        )

    def _compute(self, predictions, references):
        return counts.accuracy(predictions, references)
