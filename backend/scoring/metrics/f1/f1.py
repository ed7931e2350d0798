"""F1, as an `evaluate` module shipped with Fornax."""
import evaluate

from backend.data import counts
from backend.scoring.metric_info import LABEL_FEATURES
from backend.scoring.metric_info import SKLEARN_CITATION as _CITATION

_DESCRIPTION = """F1 is the harmonic mean of precision and recall: 2 TP / (2 TP + FP + FN) per label.
Computed from the confusion matrix: with average="macro" (default) the unweighted mean of
the per-label values over every label seen in predictions or references (a label never predicted counts precision
0, as scikit-learn's zero_division=0); with average="micro" from the true/false positives pooled over labels, which
for single-label data equals accuracy. Labels may be integers or strings. Range 0-1."""


_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int or str): predicted labels.
    references (list of int or str): true labels, as many as predictions.
    average (str): "macro" (default) or "micro".
    labels (list, optional): the labels to average over (default: every label seen).
Returns:
    f1 (float, 0-1).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=LABEL_FEATURES,
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        return {"f1": counts.precision_recall_f1(predictions, references, average=average, labels=labels)["f1"]}
