"""Exact match, as an `evaluate` module shipped with Fornax."""
import datasets
import evaluate

from backend.scoring import scores

_DESCRIPTION = """Exact match is the share of predictions that equal their reference (or one of their references)
character for character, after optional normalisation: surrounding whitespace stripped (default on), case folded,
ASCII punctuation removed. Range 0-1."""

_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing",
    year = "2016",
    pages = "2383--2392",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): each prediction's accepted answer(s).
    strip (bool): strip surrounding whitespace first. Default True.
    ignore_case (bool): default False.
    ignore_punctuation (bool): default False.
Returns:
    exact_match (float, 0-1).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
            ],
            reference_urls=["https://aclanthology.org/D16-1264/"],
        )

    def _compute(self, predictions, references, strip=True, ignore_case=False, ignore_punctuation=False):
        return scores.exact_match(predictions, references, strip=strip, ignore_case=ignore_case,
                                  ignore_punctuation=ignore_punctuation)
