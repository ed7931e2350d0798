"""ROUGE through Google's rouge_score, as an `evaluate` module shipped with Fornax."""
import datasets
import evaluate

from backend.scoring import scores

_DESCRIPTION = """ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares a generated text with its
reference(s) by overlapping units: rouge1 / rouge2 (unigrams / bigrams), rougeL (longest common subsequence over the
whole text) and rougeLsum (LCS per sentence, sentences separated by newlines). Each example's F-measure is computed
by rouge_score (with several references, the best one counts) and averaged over the examples; no bootstrap
resampling, so the same inputs always give the same numbers. rouge_score's tokenizer keeps only ASCII letters and
digits, like the original ROUGE: text in other scripts scores 0. Range 0-1."""

_CITATION = """@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated texts.
    references (list of str, or list of lists of str): each prediction's reference(s).
    rouge_types (list of str): default ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_stemmer (bool): Porter-stem words before matching. Default False.
Returns:
    one mean F-measure (0-1) per ROUGE type, e.g. {"rouge1": 0.5, "rougeL": 0.4, ...}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
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
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _compute(self, predictions, references, rouge_types=scores.ROUGE_TYPES, use_stemmer=False):
        return scores.rouge(predictions, references, rouge_types=tuple(rouge_types), use_stemmer=use_stemmer)
