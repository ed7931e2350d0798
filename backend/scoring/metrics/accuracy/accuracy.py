"""Accuracy, as an `evaluate` module shipped with Fornax."""
import datasets
import evaluate

from backend.scoring import scores

_DESCRIPTION = """Accuracy is the share of predictions equal to their reference label: (TP + TN) / all in the
binary case, correct / all for any number of classes. Labels may be integers or strings. Range 0-1."""

_CITATION = """@article{scikit-learn,
    title = {Scikit-learn: Machine Learning in {P}ython},
    author = {Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
              Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
              Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
    journal = {Journal of Machine Learning Research},
    volume = {12},
    pages = {2825--2830},
    year = {2011}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int or str): predicted labels.
    references (list of int or str): true labels, as many as predictions.
Returns:
    accuracy (float, 0-1).
"""

LABEL_FEATURES = [
    datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


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
        return scores.accuracy(predictions, references)
