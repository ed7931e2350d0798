"""Fill-mask and pseudo-log-likelihood stop on a deadline (budget.Deadline), checked before each forward: an expired
one is refused (a plain TimeBudgetError) after at most one forward, one that runs out mid-way stops the PLL between
its forwards, and no deadline works as before. On a tiny random BERT built by transformers in the test; the tab's
handlers pass the deployment's per-event deadline."""
import time

import gradio as gr
import pytest
import torch

import backend
from backend.budget import Deadline, TimeBudgetError
from backend.generation.fill_mask import MASK_TOKEN
from tests.backend.test_encoder import _config, _perturb, _tokenizer

SENTENCE = "a list comprehension builds a new list"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertForMaskedLM

    folder = tmp_path_factory.mktemp("pll-deadline") / "bert"
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    _perturb(BertForMaskedLM(_config(len(tok)))).save_pretrained(folder)
    return backend.load(str(folder), dtype="float32", device="cpu")


@pytest.fixture
def forwards(bert, monkeypatch):
    """How many forwards the handle ran; `.then`: a function called after each (to expire a deadline mid-way)."""
    count = Counter()
    real = bert.logits

    def logits(*args, **kwargs):
        count.n += 1
        out = real(*args, **kwargs)
        count.then()
        return out

    monkeypatch.setattr(bert, "logits", logits)
    return count


class Counter:
    def __init__(self):
        self.n = 0
        self.then = lambda: None


def expired(what="this pseudo-log-likelihood") -> Deadline:
    deadline = Deadline(60, what)
    deadline.at = time.monotonic() - 1  # already past
    return deadline


def test_an_expired_deadline_is_refused_after_at_most_one_forward(bert, forwards):
    with pytest.raises(TimeBudgetError, match="this pseudo-log-likelihood ran past"):
        bert.pseudo_log_likelihood(SENTENCE, deadline=expired())
    assert forwards.n <= 1
    with pytest.raises(TimeBudgetError, match="this fill-mask ran past"):
        bert.fill_mask(f"a list {MASK_TOKEN} a new list", deadline=expired("this fill-mask"))
    assert forwards.n <= 1
    assert isinstance(TimeBudgetError("x"), backend.GenerationError)  # a plain error, not a crash


def test_a_deadline_running_out_stops_the_pll_between_forwards(bert, forwards):
    from backend.generation.fill_mask import pseudo_log_likelihood

    deadline = Deadline(60, "this pseudo-log-likelihood")
    forwards.then = lambda: setattr(deadline, "at", time.monotonic() - 1)  # runs out during the first forward
    with pytest.raises(TimeBudgetError):
        pseudo_log_likelihood(bert, SENTENCE, batch_size=1, deadline=deadline)
    assert forwards.n == 1                             # of one forward per token: the second never ran


def test_no_deadline_or_a_generous_one_scores_as_before(bert, forwards):
    plain = bert.pseudo_log_likelihood(SENTENCE)
    timed = bert.pseudo_log_likelihood(SENTENCE, deadline=Deadline(600, "this pseudo-log-likelihood"))
    assert plain["pll"] == pytest.approx(timed["pll"]) and len(plain["tokens"]) > 1
    assert forwards.n == 2                             # one batch of masked rows each
    assert bert.fill_mask(f"a list {MASK_TOKEN} a new list", deadline=Deadline(None))[0]


def test_the_tabs_handlers_pass_the_events_deadline(bert, monkeypatch):
    from playground.state import current
    from playground.tabs import fill_mask

    made = []
    monkeypatch.setattr(Deadline, "for_event", classmethod(lambda cls, what="": made.append(what) or expired(what)))
    monkeypatch.setattr(current, "handle", bert)
    for call, what in ((lambda: fill_mask.pseudo_log_likelihood(SENTENCE), "this pseudo-log-likelihood"),
                       (lambda: fill_mask.fill(f"a list {MASK_TOKEN} a new list", 3), "this fill-mask")):
        with pytest.raises(gr.Error) as e:
            call()
        assert f"{what} ran past this deployment's time limit" in e.value.message
    assert made == ["this pseudo-log-likelihood", "this fill-mask"]
