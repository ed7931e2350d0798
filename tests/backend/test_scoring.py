"""Scoring: sliding-window perplexity against the same computation done with transformers, the shipped metric modules
against the libraries called directly, classification metrics against hand counts and scikit-learn."""
import math
import os
import subprocess
import sys

import pytest
import torch

import backend
from backend.errors import ScoringError
from backend.loading import default_gguf_path
from backend.scoring.agreement import backend_agreement, logits_agreement
from backend.scoring.modules import METRICS, compute_metric, load_metric, metric_path
from backend.scoring.perplexity import check_window, default_max_length, perplexity, windows
from backend.data.counts import confusion, precision_recall_f1
from tests.backend.tiny import corpus_text, make_tiny


def transformers_sliding_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's "Perplexity of fixed-length models", run by transformers' own loss (which shifts
    the labels), with each window weighted by the number of labels that loss really averaged."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * scored
        n_tokens += scored
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def tiny(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    theirs = make_tiny(request.param, folder)
    return backend.load(folder), theirs, PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


@pytest.mark.parametrize("max_length,stride", [(64, 24), (48, 48), (127, 1000)])
def test_perplexity_equals_transformers_sliding_window(tiny, max_length, stride):
    ours, theirs, tok = tiny
    text = corpus_text()[:1500]
    ids = tok(text)["input_ids"]
    assert ours.tokenizer.encode(text) == ids and len(ids) > 200
    if stride > max_length:
        with pytest.raises(ScoringError, match="stride"):
            perplexity(ours.logits, [ids], max_length, stride)
        return
    expected, n_tokens = transformers_sliding_perplexity(theirs, ids, max_length, stride)
    got = compute_metric("perplexity", [text], model=ours, max_length=max_length, stride=stride)
    unscored = 1 if stride < max_length else math.ceil(len(ids) / stride)  # side by side: each window's first
    assert got["tokens"] == n_tokens == len(ids) - unscored
    assert abs(got["perplexity"] - expected) / expected <= 5e-3
    assert abs(got["perplexity"] - expected) / expected <= 1e-5  # in fact the same to float rounding


def test_perplexity_pools_tokens_over_texts(tiny):
    ours, theirs, tok = tiny
    texts = [corpus_text()[:400], corpus_text()[5000:5900]]
    ids = [tok(t)["input_ids"] for t in texts]
    got = compute_metric("perplexity", texts, logits_fn=ours.logits, tokenizer=ours.tokenizer, max_length=64,
                         stride=32)
    each = [transformers_sliding_perplexity(theirs, x, 64, 32)[0] for x in ids]
    pooled = math.exp(sum(math.log(p) * (len(x) - 1) for p, x in zip(each, ids)) / sum(len(x) - 1 for x in ids))
    assert got["perplexities"] == pytest.approx(each, rel=1e-5)
    assert got["perplexity"] == pytest.approx(pooled, rel=1e-5)


def test_window_checks():
    assert check_window(1024, None) == (1024, 512)
    with pytest.raises(ScoringError, match="GiB of logits"):  # refused before anything is allocated
        check_window(8192, 128, context=8192, vocab=49152)
    assert default_max_length(8192, 49152) == 1024 and default_max_length(128, 384) == 128
    big = default_max_length(8192, 512000)  # a huge vocabulary: a shorter default window that passes the budget
    assert big < 1024 and check_window(big, None, 8192, 512000) == (big, big // 2)
    with pytest.raises(ScoringError, match="context"):
        check_window(256, 128, context=128)
    with pytest.raises(ScoringError, match=">= 2"):
        check_window(1, 1)


def test_label_scores_do_not_depend_on_how_rows_are_batched(tiny, monkeypatch):
    from backend.data import labels as classify

    ours, _, _ = tiny
    texts = ["short", "a much longer text " * 6, "medium sized text here", "x"]
    whole = classify.label_scores(ours.logits, ours.tokenizer, texts, ["yes", "no", "maybe"], 100)
    monkeypatch.setattr(classify, "LOGITS_BUDGET", 4 * ours.config.vocab_size * 60)  # at most 60 positions a batch
    seen = []
    split = classify.label_scores(ours.logits, ours.tokenizer, texts, ["yes", "no", "maybe"], 100,
                                  on_batch=seen.append)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-4)
    assert sum(seen) == 12 and len(seen) > 2


def test_windows_score_every_token_once():
    for n, max_length, stride in [(10, 4, 2), (10, 4, 1), (3, 8, 4), (100, 7, 3), (10, 4, 4)]:
        scored = [p for _, end, first in windows(n, max_length, stride) for p in range(first, end)]
        assert all(end - begin <= max_length for begin, end, _ in windows(n, max_length, stride))
        if stride < max_length:
            assert scored == list(range(1, n))
        else:  # windows side by side: each window's first token has no context and is not scored (the recipe's)
            assert scored == [p for p in range(1, n) if p % stride]


def test_agreement_of_a_function_with_itself_and_with_a_perturbed_copy(tiny):
    ours, _, tok = tiny
    ids = [tok(corpus_text()[:800])["input_ids"]]
    same = backend_agreement(ours.logits, ours.logits, ids, max_length=64, stride=32)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    assert same["perplexity_delta"] == 0.0
    assert same["perplexity_ref"] == pytest.approx(perplexity(ours.logits, ids, 64, 32)["perplexity"], rel=1e-6)
    noisy = lambda x: ours.logits(x) + 0.5 * torch.randn(*x.shape, ours.config.vocab_size)  # noqa: E731
    torch.manual_seed(0)
    other = backend_agreement(ours.logits, noisy, ids, max_length=64, stride=32)
    assert other["mean_kl"] > 1e-3 and other["top1_agreement"] < 1.0
    # the one-window form (the export parity report) is the same computation
    x = torch.tensor(ids[0][:64])
    one = logits_agreement(ours.logits(x[None])[0], ours.logits(x[None])[0] * 1.1, x)
    ref_logp, got_logp = ours.logits(x[None])[0].log_softmax(-1), (ours.logits(x[None])[0] * 1.1).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1)[:-1].mean().item()
    assert one["mean_kl"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.skipif(default_gguf_path() is None, reason=f"default model not installed: {backend.DEFAULT_INSTALL}")
def test_default_model_perplexity_equals_transformers():
    """The default GGUF model: transformers reads the folder our GGUF conversion wrote (the same weights)."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM

    from backend.loading import resolve

    ours = backend.load("default", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(resolve("default"), dtype=torch.float32).eval()
    text = topics["with"][:700]
    ids = ours.tokenizer.encode(text)
    expected, _ = transformers_sliding_perplexity(theirs, ids, 96, 48)
    got = compute_metric("perplexity", [text], model=ours, max_length=96, stride=48)
    print(f"default model perplexity ({len(ids)} tokens, window 96 / stride 48): ours {got['perplexity']:.4f}, "
          f"transformers {expected:.4f}")
    assert abs(got["perplexity"] - expected) / expected <= 5e-3


# --- the text metrics against the libraries called directly ---
PREDICTIONS = ["The cat sat on the mat.", "A quick brown fox jumps over the dog", "Paris is the capital of France",
               "hello there general kenobi", "the weather is nice today and tomorrow"]
REFERENCES = ["The cat is sitting on the mat.", "The quick brown fox jumps over the lazy dog.",
              "The capital of France is Paris.", "hello there", "it will rain tomorrow"]
REFERENCES_2 = ["A cat sat on a mat.", "A fast brown fox leaps over the dog.", "Paris is France's capital.",
                "general kenobi, hello", "tomorrow the weather will be nice"]


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    got = compute_metric("bleu", PREDICTIONS, REFERENCES)
    assert got["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert 0 < got["bleu"] < 100
    two = compute_metric("bleu", PREDICTIONS, [list(r) for r in zip(REFERENCES, REFERENCES_2)])
    assert two["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, REFERENCES_2]).score
    assert compute_metric("chrf", PREDICTIONS, REFERENCES)["chrf"] == sacrebleu.corpus_chrf(
        PREDICTIONS, [REFERENCES]).score
    assert compute_metric("chrf", PREDICTIONS, REFERENCES, word_order=2)["chrf"] == sacrebleu.corpus_chrf(
        PREDICTIONS, [REFERENCES], word_order=2).score


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types)
    got = compute_metric("rouge", PREDICTIONS, REFERENCES)
    for t in types:
        expected = sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / len(PREDICTIONS)
        assert got[t] == pytest.approx(expected, abs=1e-12)
    assert 0 < got["rouge1"] < 1


def test_exact_match_by_hand():
    got = compute_metric("exact_match", [" Paris", "paris", "Rome!", "x"], ["Paris", "Paris", "Rome", "y"])
    assert got["exact_match"] == 0.25
    got = compute_metric("exact_match", [" Paris", "paris", "Rome!", "x"], ["Paris", "Paris", "Rome", "y"],
                         ignore_case=True, ignore_punctuation=True)
    assert got["exact_match"] == 0.75


def test_classification_metrics_by_hand_and_against_sklearn():
    pred = ["cat", "cat", "dog", "bird", "dog", "cat"]
    gold = ["cat", "dog", "dog", "dog", "bird", "cat"]
    # by hand: cat tp 2 fp 1 fn 0; dog tp 1 fp 1 fn 2; bird tp 0 fp 1 fn 1
    p = {"cat": 2 / 3, "dog": 1 / 2, "bird": 0.0}
    r = {"cat": 1.0, "dog": 1 / 3, "bird": 0.0}
    f = {k: 2 * p[k] * r[k] / (p[k] + r[k]) if p[k] + r[k] else 0.0 for k in p}
    assert compute_metric("accuracy", pred, gold)["accuracy"] == pytest.approx(3 / 6)
    assert compute_metric("precision", pred, gold)["precision"] == pytest.approx(sum(p.values()) / 3)
    assert compute_metric("recall", pred, gold)["recall"] == pytest.approx(sum(r.values()) / 3)
    assert compute_metric("f1", pred, gold)["f1"] == pytest.approx(sum(f.values()) / 3)
    assert compute_metric("f1", pred, gold, average="micro")["f1"] == pytest.approx(0.5)
    labels, matrix = confusion(pred, gold, ["bird", "cat", "dog"])
    assert matrix.tolist() == [[0, 0, 1], [0, 2, 0], [1, 1, 1]]
    assert compute_metric("accuracy", [1, 0, 1, 1], [1, 1, 1, 0])["accuracy"] == 0.5  # integer labels too
    sk = pytest.importorskip("sklearn.metrics")
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 4, (40,), generator=rng).tolist()
        b = torch.randint(0, 5, (40,), generator=rng).tolist()
        for average in ("macro", "micro"):
            ours = precision_recall_f1(a, b, average)
            assert ours["f1"] == pytest.approx(sk.f1_score(b, a, average=average, zero_division=0))
            assert ours["precision"] == pytest.approx(sk.precision_score(b, a, average=average, zero_division=0))
            assert ours["recall"] == pytest.approx(sk.recall_score(b, a, average=average, zero_division=0))


def test_metric_inputs_are_checked():
    with pytest.raises(ScoringError, match="empty"):
        compute_metric("bleu", [], [])
    with pytest.raises(ScoringError, match="2 predictions but 3 references"):
        compute_metric("accuracy", [1, 2], [1, 2, 3])
    with pytest.raises(ScoringError, match="unknown metric 'blue'"):
        load_metric("blue")
    with pytest.raises(ScoringError, match="same number"):
        compute_metric("bleu", ["a b", "c d"], [["a b"], ["c d", "e f"]])


def test_every_module_loads_offline_by_path():
    """In a fresh process with the Hub switched off: each module loads from its folder and carries its card."""
    code = ("import evaluate\nfrom backend.scoring.modules import METRICS, metric_path\n"
            "for name in METRICS:\n"
            "    m = evaluate.load(str(metric_path(name)))\n"
            "    assert m.description and m.citation and m.features and m.inputs_description, name\n"
            "print(evaluate.load(str(metric_path('accuracy'))).compute(predictions=[1, 0], references=[1, 1]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert "{'accuracy': 0.5}" in out.stdout
    for name in METRICS:  # a `# From:` comment on an import line makes evaluate try to download it
        assert "From:" not in (metric_path(name) / f"{name}.py").read_text(), name
