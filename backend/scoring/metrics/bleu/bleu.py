"""BLEU through sacrebleu, as an `evaluate` module shipped with Fornax (load it with evaluate.load(<this folder>))."""
import datasets
import evaluate

from backend.scoring import scores

_DESCRIPTION = """BLEU (Bilingual Evaluation Understudy) scores a generated text by its modified n-gram precisions
(n = 1..4) against one or more references, times a brevity penalty for outputs shorter than the references. It is
computed over the whole corpus by sacrebleu, whose standard tokenization (13a) makes scores comparable across papers.
Range 0-100, higher is better."""

_CITATION = """@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
    year = "2002",
    pages = "311--318",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): each prediction's reference(s); every prediction needs the
        same number of references.
    tokenize (str, optional): sacrebleu tokenizer ("13a" by default, "zh", "intl", "char", "none", ...).
    lowercase (bool): lowercase before scoring. Default False.
    smooth_method (str): "exp" (default), "floor", "add-k" or "none".
Returns:
    bleu (float, 0-100), counts, totals, precisions (per n-gram order), brevity_penalty, sys_len, ref_len.
Example:
    >>> bleu = evaluate.load("backend/scoring/metrics/bleu")
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["bleu"]
    100.00000000000004
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
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
            reference_urls=["https://aclanthology.org/P02-1040/", "https://aclanthology.org/W18-6319/"],
        )

    def _compute(self, predictions, references, tokenize=None, lowercase=False, smooth_method="exp"):
        return scores.bleu(predictions, references, tokenize=tokenize, lowercase=lowercase,
                           smooth_method=smooth_method)
