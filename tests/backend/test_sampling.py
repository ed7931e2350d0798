"""Sampling semantics on small hand-built distributions, and parameter validation."""
import math

import pytest
import torch

from backend import GenerationError, SamplingParams, sample
from backend.generation.sampling import apply_penalties, filter_logits

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def kept(logits) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def params(**kw) -> SamplingParams:
    return SamplingParams.from_kwargs(**{"temperature": 1.0, **kw})


def test_top_k_keeps_exactly_k():
    logits = torch.randn(1, 100)
    for k in (1, 3, 17):
        out = filter_logits(logits, params(top_k=k))
        assert kept(out) == sorted(torch.topk(logits[0], k).indices.tolist())


@pytest.mark.parametrize("top_p, expected", [(0.4, [0]), (0.79, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, expected):
    assert kept(filter_logits(LOGITS, params(top_p=top_p))) == expected


@pytest.mark.parametrize("min_p, expected", [(0.05, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (0.9, [0])])
def test_min_p_is_relative_to_the_most_likely_token(min_p, expected):
    assert kept(filter_logits(LOGITS, params(min_p=min_p))) == expected


def test_temperature_scales_logits_before_sampling():
    g = torch.Generator().manual_seed(0)
    p = params(temperature=2.0)
    draws = torch.stack([sample(LOGITS, p, generator=g) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = (LOGITS[0] / 2.0).softmax(-1)
    assert (freq - expected).abs().max() < 0.015


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, params(repetition_penalty=2.0), seen, None)
    assert out.tolist() == [[1.0, -2.0, 2.0, -1.0]]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_penalties(logits, params(presence_penalty=0.5, frequency_penalty=0.25), None, counts)
    assert out.tolist() == [[0.0, -0.75, -1.25]]


def test_greedy_takes_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, params(temperature=0)).item() == 0
    assert sample(logits, params(temperature=0, repetition_penalty=2.0), seen).item() == 1


def test_seeded_sampling_is_deterministic():
    logits = torch.randn(4, 50)
    draw = lambda s: sample(logits, params(top_p=0.9), generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(7), draw(7))


@pytest.mark.parametrize("bad, word", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.0), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(num_samples=1000), "num_samples"), (dict(stop=[1, 2]), "stop"), (dict(temprature=1), "temprature"),
    (dict(max_new_tokens="ten"), "max_new_tokens"),
])
def test_absurd_values_are_refused_by_name(bad, word):
    with pytest.raises(GenerationError, match=word):
        SamplingParams.from_kwargs(**bad)
