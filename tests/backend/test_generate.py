"""The generation engine on a tiny model: seeds, batches, streaming, stop strings, log-probabilities."""
import pytest
import torch

import backend
from backend.generation.generate import TextAssembler
from tests.backend.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder)
    return backend.load(folder)


def test_same_seed_same_text_other_seed_other_text(tiny):
    run = lambda seed: tiny.generate("The", max_new_tokens=24, temperature=1.0, seed=seed, ignore_eos=True).text  # noqa
    assert run(11) == run(11)
    assert len({run(11), run(12), run(13)}) > 1


def test_num_samples_are_independent_and_reproducible(tiny):
    kw = dict(max_new_tokens=16, temperature=1.0, seed=5, num_samples=3, ignore_eos=True)
    first, again = tiny.generate("The", **kw), tiny.generate("The", **kw)
    assert len(first.completions) == 3 and first.texts == again.texts
    assert len(set(first.texts)) > 1


def test_stream_deltas_add_up_to_the_result(tiny):
    stream = tiny.stream("The", max_new_tokens=20, temperature=1.0, seed=3, num_samples=2, ignore_eos=True)
    parts = ["", ""]
    for delta in stream:
        parts[delta.index] += delta.text
    assert parts == stream.result.texts
    t = stream.result.timings
    assert t.prompt_tokens == len(tiny.encode("The")) and t.new_tokens == 40 and t.decode_tok_s > 0


def test_stop_string_ends_generation_and_is_not_shown(tiny):
    kw = dict(max_new_tokens=48, temperature=1.0, seed=1, ignore_eos=True)
    full = tiny.generate("The", **kw).text
    stop = next(c for c in full[len(full) // 3:] if c.isascii() and c.isprintable() and not c.isspace())
    result = tiny.generate("The", **kw, stop=[stop])
    assert result.text == full[:full.index(stop)]
    assert result.completions[0].finish_reason == "stop"


def _stream_text(tokenizer, text, stop):
    asm, shown = TextAssembler(tokenizer, stop), []
    for tok in tokenizer.encode(text, add_special_tokens=False):
        delta, stopped = asm.add(tok)
        shown.append(delta)
        if stopped:
            return shown, True
    shown.append(asm.flush())
    return shown, False


def test_stream_never_shows_part_of_a_stop_string(tiny):
    tok = tiny.tokenizer
    shown, stopped = _stream_text(tok, "Results follow. Observation: none. More text.", ["Observation:"])
    assert stopped and "".join(shown) == "Results follow. "
    seen = ""
    for delta in shown:  # at no moment did the screen end with a piece of the stop string
        seen += delta
        assert not any(seen.endswith("Observation:"[:n]) for n in range(1, 12)) or not delta
    shown, stopped = _stream_text(tok, "Observe the obsidian.", ["Observation:"])  # a false start is released
    assert not stopped and "".join(shown) == "Observe the obsidian."


def test_stream_never_shows_half_a_character(tiny):
    tok = tiny.tokenizer
    text = "Emoji 🎉🚀 and 東京."
    shown, _ = _stream_text(tok, text, [])
    assert "".join(shown) == text and not any("\ufffd" in d for d in shown)


def test_logprobs_are_the_models_own(tiny):
    result = tiny.generate("The", max_new_tokens=6, temperature=0, top_logprobs=3, ignore_eos=True)
    c = result.completions[0]
    ids = torch.tensor([result.prompt_ids + c.token_ids])
    logp = tiny.logits(ids)[0].log_softmax(-1)
    P = len(result.prompt_ids)
    for i, info in enumerate(c.tokens):
        expected = logp[P - 1 + i]
        assert abs(info.logprob - expected[info.id].item()) < 1e-4
        assert [a[0] for a in info.top] == torch.topk(expected, 3).indices.tolist()
        assert info.top[0][0] == info.id  # greedy picks the top alternative


def test_prompt_limits(tiny):
    ctx = tiny.config.max_seq_len
    with pytest.raises(backend.GenerationError, match="context"):
        tiny.generate([5] * (ctx + 1), max_new_tokens=1)
    with pytest.raises(backend.GenerationError, match="max_new_tokens"):
        tiny.generate([5] * 10, max_new_tokens=ctx)
    with pytest.raises(backend.GenerationError, match="empty"):
        tiny.generate("", max_new_tokens=4)
    assert tiny.generate("The", max_new_tokens=2, temperature=0).completions  # still usable


def test_chunked_prefill_gives_the_one_shot_logits_and_reports_progress(tmp_path):
    """A prompt ingested in chunks at increasing positions leaves the same last logits as one forward."""
    import torch

    import backend
    from backend.generation.generate import prefill
    from tests.backend.tiny import make_tiny

    make_tiny("llama", tmp_path / "m")
    h = backend.load(str(tmp_path / "m"))
    ids = list(range(5, 105))  # 100 tokens
    runner = h.runner("eager")
    runner.start(2, 110)
    whole = prefill(runner, ids, 2, chunk=1000)
    runner.start(2, 110)
    seen = []
    chunked = prefill(runner, ids, 2, chunk=32, progress=lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    assert seen == [(32, 100), (64, 100), (96, 100), (100, 100)]
    # and decoding continues from the chunked cache exactly as from the one-shot one
    nxt = whole.argmax(-1)
    after_chunked = runner.forward(nxt[:, None], 100)
    runner.start(2, 110)
    prefill(runner, ids, 2, chunk=1000)
    torch.testing.assert_close(after_chunked, runner.forward(nxt[:, None], 100), atol=1e-4, rtol=1e-4)


def test_stop_during_a_long_prompt_ends_between_chunks(tmp_path, monkeypatch):
    """Stop pressed while a long prompt is ingested ends the run after the chunk in progress, not at the end."""
    import backend
    import backend.generation.generate as generate
    from tests.backend.tiny import make_tiny

    make_tiny("llama", tmp_path / "m")
    h = backend.load(str(tmp_path / "m"))
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    seen = []
    stream = h.stream(list(range(5, 105)), max_new_tokens=4, temperature=0,
                      prefill_progress=lambda done, total: seen.append(done), should_stop=lambda: len(seen) >= 2)
    assert list(stream) == []
    assert seen == [16, 32]                       # two chunks of 16 ingested, then Stop took effect
    assert [c.finish_reason for c in stream.result.completions] == ["cancelled"]
    assert stream.result.completions[0].token_ids == []
    assert h.generate("The", max_new_tokens=2, temperature=0).completions[0].token_ids  # still usable
