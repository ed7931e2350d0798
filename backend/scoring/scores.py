"""The metric maths, as plain functions: text overlap through sacrebleu and rouge_score (the classification counts
live in backend/data/counts.py, which a finetune's validation shares). The `evaluate` modules in metrics/ call these,
so there is one definition of each.

Every function checks its inputs and raises ScoringError naming the problem (empty lists, mismatched counts)."""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from ..data.counts import check_pairs
from ..errors import ScoringError


def reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-example references (a string or a list of strings) -> sacrebleu's reference streams (one list per
    reference position, each as long as the predictions). Every example must have the same number."""
    per_example = [[r] if isinstance(r, str) else list(r) for r in references]
    counts = {len(r) for r in per_example}
    if len(counts) != 1 or 0 in counts:
        raise ScoringError(f"every example needs the same number (>= 1) of references; found {sorted(counts)}")
    return [list(stream) for stream in zip(*per_example)]


# --- text overlap ---
def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str | None = None,
         lowercase: bool = False, smooth_method: str = "exp") -> dict:
    """Corpus BLEU (0-100) with sacrebleu's default 13a tokenization."""
    from sacrebleu.metrics import BLEU

    check_pairs(predictions, references)
    result = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method).corpus_score(
        list(predictions), reference_streams(references))
    return {"bleu": result.score, "counts": list(result.counts), "totals": list(result.totals),
            "precisions": list(result.precisions), "brevity_penalty": result.bp, "sys_len": result.sys_len,
            "ref_len": result.ref_len}


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]], char_order: int = 6,
         word_order: int = 0, beta: int = 2, lowercase: bool = False) -> dict:
    """Corpus chrF (0-100); word_order=2 is chrF++."""
    from sacrebleu.metrics import CHRF

    check_pairs(predictions, references)
    result = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase).corpus_score(
        list(predictions), reference_streams(references))
    return {"chrf": result.score, "char_order": char_order, "word_order": word_order, "beta": beta}


def sentence_chrf(prediction: str, references: str | Sequence[str]) -> float:
    import sacrebleu

    refs = [references] if isinstance(references, str) else list(references)
    return sacrebleu.sentence_chrf(prediction, refs).score


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_example(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                      rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = False) -> list[dict]:
    """F-measure of each ROUGE type per example (the best reference where there are several). rouge_score's
    tokenizer keeps only ASCII letters and digits, as the original ROUGE does: other scripts score 0."""
    from rouge_score import rouge_scorer

    check_pairs(predictions, references)
    unknown = [t for t in rouge_types if not re.fullmatch(r"rouge([1-9]|L|Lsum)", t)]
    if unknown or not rouge_types:
        raise ScoringError(f"unknown ROUGE type(s) {unknown or '(none)'}; use rouge1..rouge9, rougeL, rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    rows = []
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(list(ref), pred)
        rows.append({t: float(scores[t].fmeasure) for t in rouge_types})
    return rows


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = False) -> dict:
    """Mean F-measure over the examples per ROUGE type (no bootstrap resampling: the same inputs give the same
    number)."""
    rows = rouge_per_example(predictions, references, rouge_types, use_stemmer)
    return {t: float(np.mean([r[t] for r in rows])) for t in rouge_types}


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str, strip: bool = True, ignore_case: bool = False, ignore_punctuation: bool = False
                     ) -> str:
    text = text.strip() if strip else text
    text = text.lower() if ignore_case else text
    return text.translate(_PUNCTUATION) if ignore_punctuation else text


def exact_match_per_example(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                            strip: bool = True, ignore_case: bool = False, ignore_punctuation: bool = False
                            ) -> list[float]:
    check_pairs(predictions, references)
    norm = lambda s: normalize_answer(s, strip, ignore_case, ignore_punctuation)  # noqa: E731
    return [float(any(norm(p) == norm(r) for r in ([ref] if isinstance(ref, str) else ref)))
            for p, ref in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]], strip: bool = True,
                ignore_case: bool = False, ignore_punctuation: bool = False) -> dict:
    """Share of predictions equal to (one of) their reference(s) after the chosen normalisation."""
    hits = exact_match_per_example(predictions, references, strip, ignore_case, ignore_punctuation)
    return {"exact_match": float(np.mean(hits))}
