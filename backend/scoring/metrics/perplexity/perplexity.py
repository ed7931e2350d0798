"""Perplexity of a loaded Fornax model with a sliding window, as an `evaluate` module shipped with Fornax."""
import datasets
import evaluate

from backend.errors import ScoringError
from backend.scoring import perplexity as ppl

_DESCRIPTION = """Perplexity is the exponential of the mean negative log-likelihood per token a causal language
model assigns to a text: lower is better, and 1 means every token was predicted with certainty. This module scores
with a model that is already loaded (a Fornax handle, or any function from token ids (B, T) to logits (B, T, V)), so
nothing is loaded twice. Texts longer than the window are scored with the sliding-window recipe of Hugging Face's
"Perplexity of fixed-length models": windows of max_length tokens every stride tokens, each token scored once with
up to max_length - stride tokens of context carried over. The mean is token-weighted over all texts (one corpus
number); each text's own perplexity is returned too. Texts are not padded."""

_CITATION = """@article{jelinek1977perplexity,
    title = {Perplexity - a measure of the difficulty of speech recognition tasks},
    author = {Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
    journal = {The Journal of the Acoustical Society of America},
    volume = {62},
    number = {S1},
    pages = {S63--S63},
    year = {1977}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score (each at least two tokens long).
    model: a loaded Fornax model (backend.load(...)); or give logits_fn and tokenizer instead.
    backend (str, optional): which of the model's execution paths runs the forward (default: its own).
    logits_fn (callable, optional): token ids (B, T) int64 -> logits (B, T, V).
    tokenizer (optional): anything with encode(text) -> list of ids (with logits_fn).
    max_length (int): window length in tokens (default: 1024, or less for a short context or a huge vocabulary).
    stride (int): tokens between window starts, 1..max_length (default: max_length // 2).
    on_window (callable, optional): called after each window (a progress bar's update).
Returns:
    perplexity (float), mean_nll (nats per token), tokens (scored), perplexities (one per text), max_length, stride.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, model=None, backend=None, logits_fn=None, tokenizer=None, max_length=None,
                 stride=None, on_window=None):
        if (model is None) == (logits_fn is None):
            raise ScoringError("give either model (a loaded Fornax model) or logits_fn (with tokenizer)")
        context = vocab = None
        if model is not None:
            logits_fn = ppl.handle_logits_fn(model, backend)
            tokenizer = tokenizer or model.tokenizer
            context, vocab = model.config.max_seq_len, model.config.vocab_size
        if tokenizer is None:
            raise ScoringError("logits_fn needs a tokenizer to turn the texts into token ids")
        if max_length is None:
            max_length = ppl.default_max_length(context, vocab)
        token_ids = [tokenizer.encode(text) for text in predictions]
        return ppl.perplexity(logits_fn, token_ids, max_length=max_length, stride=stride, context=context,
                              on_window=on_window, vocab=vocab)
