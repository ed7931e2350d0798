"""The export forward (export/graph.py) against the model's own forward on tiny random models."""
import pytest
import torch

import backend
from export.graph import forward_with_past
from tests.backend.tiny import make_tiny


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, folder)
    return hf, backend.load(folder, dtype="float32", device="cpu")


def test_forward_with_past_handles_padding_and_cache(pair):
    """The export forward (explicit positions, padding mask, concatenated past) agrees with the plain forward."""
    hf, ours = pair
    model = ours.model
    cfg = ours.config
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    full = ours.logits(ids)
    empty = [(torch.zeros(1, cfg.n_kv_head, 0, cfg.head_dim),) * 2 for _ in range(cfg.n_layer)]
    with torch.no_grad():
        first, past = forward_with_past(model, ids[:, :8], torch.arange(8)[None], torch.ones(1, 8), empty)
        rest, _ = forward_with_past(model, ids[:, 8:], torch.arange(8, 12)[None], torch.ones(1, 12), past)
        torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
        # left padding: 3 pad tokens before the same text give the same logits on the real tokens
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 12)], 1)
        positions = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(12)[None]], 1)
        out, _ = forward_with_past(model, padded, positions, mask, empty)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 3:], full, atol=1e-5, rtol=1e-5)
