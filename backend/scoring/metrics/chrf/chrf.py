"""chrF / chrF++ through sacrebleu, as an `evaluate` module shipped with Fornax."""
import datasets
import evaluate

from backend.scoring import scores

_DESCRIPTION = """chrF scores a generated text by the F-score of its character n-grams (n = 1..6) against the
reference(s), recall weighted beta = 2 times precision; chrF++ (word_order=2) adds word unigrams and bigrams. It is
robust to morphology and needs no tokenization. Computed over the whole corpus by sacrebleu. Range 0-100."""

_CITATION = """@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
    title = "chr{F}++: words helping character n-grams",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Second Conference on Machine Translation",
    year = "2017",
    pages = "612--618",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): each prediction's reference(s), the same number for all.
    char_order (int): character n-gram order, default 6.
    word_order (int): word n-gram order, default 0 (chrF); 2 gives chrF++.
    beta (int): recall weight, default 2.
    lowercase (bool): default False.
Returns:
    chrf (float, 0-100), char_order, word_order, beta.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W15-3049/", "https://aclanthology.org/W17-4770/"],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False):
        return scores.chrf(predictions, references, char_order=char_order, word_order=word_order, beta=beta,
                           lowercase=lowercase)
