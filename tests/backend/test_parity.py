"""Our Transformer against transformers on tiny random models: fp32 logits and greedy tokens."""
import pytest
import torch

import backend
from tests.backend.tiny import make_tiny

KINDS = ["gpt2", "gpt2-untied", "llama", "llama-untied", "qwen2", "llama3-rope"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, folder)
    return hf, backend.load(folder, dtype="float32", device="cpu")


def test_config_reads_family(pair):
    hf, ours = pair
    assert ours.config.n_layer == hf.config.num_hidden_layers
    assert ours.config.vocab_size == hf.config.vocab_size
    assert ours.config.tie_embeddings == (hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr())


def test_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ours.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_cached_decode_matches_full_forward(pair):
    """Prefill + one-token steps through the static KV cache give the same logits as one full forward."""
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (1, 24))
    full = ours.logits(ids)[0]
    runner = ours.runners["eager"]
    runner.start(1, 24)
    steps = [runner.forward(ids[:, :10], 0)[0]]
    steps.append(runner.forward(ids[:, 10:16], 10)[0])      # a chunk after cached tokens
    for t in range(16, 24):
        steps.append(runner.forward(ids[:, t:t + 1], t)[0])
    torch.testing.assert_close(torch.stack(steps), full[[9, 15, *range(16, 24)]], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_match_transformers(pair):
    hf, ours = pair
    prompt = ours.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = ours.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).completions[0].token_ids
    assert got == expected


def test_save_pretrained_round_trips_through_transformers(pair, tmp_path):
    """Our saved folder loads in transformers and in Fornax with the same logits."""
    from transformers import AutoModelForCausalLM

    hf, ours = pair
    backend.save_pretrained(ours.model, ours.tokenizer, tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backend.load(tmp_path / "saved").logits(ids), ours.logits(ids))
