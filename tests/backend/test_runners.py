"""Execution paths behind one Runner protocol: the compiled runner against eager, compile counts, Stop, timings."""
import time

import pytest
import torch

import backend
from backend.models.config import ModelConfig
from backend.loading import default_gguf_path
from backend.models.transformer import Transformer
from backend.runners.compiled import CompiledRunner
from backend.runners.eager import EagerRunner
from tests.backend.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder)
    return backend.load(folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def compiled_tiny():
    """One compiled runner shared by the tests below (compiling is the slow part)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama")).eval()
    return EagerRunner(model), CompiledRunner(model)


@torch.inference_mode()
def test_static_cache_decode_equals_full_forward_at_every_step(tiny_llama):
    """Cache written at tensor positions, attention over the whole preallocated cache under a mask."""
    runner = tiny_llama.runner("eager")
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 30))
    full = tiny_llama.logits(ids)                                  # (2, 30, V)
    runner.start(2, 30)
    assert tiny_llama.model.cache_len == min(256, tiny_llama.config.max_seq_len)  # rounded up: one shape for many
    got = [runner.forward(ids[:, :7], 0)] + [runner.forward(ids[:, t:t + 1], t) for t in range(7, 30)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, 6:], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_compiled_logits_equal_eager_and_second_prompt_does_not_recompile(compiled_tiny):
    eager, compiled = compiled_tiny
    V = eager.model.config.vocab_size
    for runner in (eager, compiled):
        runner.start(1, 80)
    prompt = torch.randint(0, V, (1, 21))
    a, b = eager.forward(prompt, 0), compiled.forward(prompt, 0)   # prefill: padded to a bucket of 32
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    token = a.argmax(-1, keepdim=True)
    for pos in range(21, 29):
        a, b = eager.forward(token, pos), compiled.forward(token, pos)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        token = a.argmax(-1, keepdim=True)
    assert compiled.compiles == 2                                  # one prefill bucket, one decode step
    # another prompt length in the same bucket, then decode: nothing new is compiled
    compiled.start(1, 60)
    compiled.forward(torch.randint(0, V, (1, 27)), 0)
    compiled.forward(token, 27)
    assert compiled.compiles == 2
    # a new bucket compiles its prefill only; decode is reused
    compiled.forward(torch.randint(0, V, (1, 9)), 0)
    compiled.forward(token, 9)
    assert compiled.compiles == 3


def test_handle_prepares_compiled_on_first_use_and_generates_like_eager(tiny_llama):
    assert "compiled" in tiny_llama.runner_names() and "compiled" not in tiny_llama.runners
    kw = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    eager = tiny_llama.generate("The quick brown fox", backend="eager", **kw)
    compiled = tiny_llama.generate("The quick brown fox", backend="compiled", **kw)
    assert compiled.completions[0].token_ids == eager.completions[0].token_ids
    sampled = [tiny_llama.generate("Once", backend=name, max_new_tokens=10, temperature=0.9, seed=3,
                                   ignore_eos=True).completions[0].token_ids for name in ("eager", "compiled")]
    assert sampled[0] == sampled[1]                                # one sampler, one RNG stream, any runner


def test_unknown_backend_names_the_available_ones(tiny_llama):
    with pytest.raises(backend.GenerationError, match="available: eager"):
        tiny_llama.generate("hi", backend="warp-drive", max_new_tokens=2)


def test_stop_ends_the_run_at_the_next_token_with_timings(tiny_llama):
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) >= 5

    stream = tiny_llama.stream("Hello", backend="eager", max_new_tokens=100, temperature=0, ignore_eos=True,
                               should_stop=should_stop)
    text = "".join(d.text for d in stream)
    result = stream.result
    assert result.completions[0].finish_reason == "cancelled"
    assert len(result.completions[0].token_ids) == 5               # the check runs before each new token
    assert text == result.text and result.timings.decode_steps == 4 and result.timings.decode_s > 0


def test_timings_measure_the_engine_not_the_consumer(tiny_llama):
    """A slow consumer (a UI between yields) must not count as decode time."""
    stream = tiny_llama.stream("Hello", backend="eager", max_new_tokens=8, temperature=0, ignore_eos=True)
    pause = 0.5
    for _ in stream:
        time.sleep(pause)
    t = stream.result.timings
    assert t.decode_steps == 7 and t.prefill_s <= t.ttft_s
    assert t.decode_s < t.decode_steps * pause / 2        # counting the consumer would make it >= steps x pause


@pytest.mark.skipif(default_gguf_path() is None, reason=f"needs {backend.DEFAULT_INSTALL}")
def test_default_model_compiled_greedy_tokens_equal_eager():
    handle = backend.load("default", dtype="float32", device="cpu")
    ids = handle.tokenizer.encode("The history of the printing press begins", add_special_tokens=False)
    ref = handle.logits(torch.tensor([ids]))[0, -1]
    kw = dict(max_new_tokens=64, temperature=0, ignore_eos=True)
    eager = handle.generate(ids, backend="eager", **kw).completions[0].token_ids
    compiled = handle.generate(ids, backend="compiled", **kw).completions[0].token_ids
    assert compiled == eager
    runner = handle.runner("compiled")
    runner.start(1, len(ids) + 1)
    torch.testing.assert_close(runner.forward(torch.tensor([ids]), 0)[0], ref, atol=1e-4, rtol=1e-4)
