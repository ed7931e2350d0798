import math

import pytest
import torch

import kernels


def reference(q, k_cache, v_cache, lengths):
    """Per sequence: softmax(q k^T / sqrt(D)) v over cache positions [0, length), fp32, K/V repeated for GQA."""
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for b, n in enumerate(lengths):
        k = k_cache[b, :, :n].float().repeat_interleave(group, dim=0)               # (H, n, D)
        v = v_cache[b, :, :n].float().repeat_interleave(group, dim=0)
        scores = q[b].float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])       # (H, 1, n)
        out.append(scores.softmax(-1) @ v)                                        # (H, 1, D)
    return torch.stack(out)


@pytest.mark.parametrize("B, H, Hk, S, D, length", [
    (2, 4, 2, 100, 16, 37),             # GQA, int length, several splits, part of the cache empty
    (2, 4, 4, 50, 64, [3, 50]),         # one length per sequence; a full cache
    (1, 6, 1, 64, 16, 1),               # a single valid slot
])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2)])
def test_decode_attention_matches_reference(B, H, Hk, S, D, length, dtype, atol, rtol, device):
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    lengths = length if isinstance(length, list) else [length] * B
    arg = torch.tensor(length, device=device) if isinstance(length, list) else length
    o = kernels.decode_attention(q, k_cache, v_cache, arg)
    assert o.shape == q.shape and o.dtype == dtype
    torch.testing.assert_close(o.float(), reference(q, k_cache, v_cache, lengths), atol=atol, rtol=rtol)


def test_decode_attention_is_the_last_row_of_causal_attention(device):
    """The cache filled with a prefix's keys: decoding its last token equals causal attention's last row."""
    torch.manual_seed(1)
    B, H, Hk, T, S, D = 1, 4, 2, 21, 48, 16
    q = torch.randn(B, H, T, D, device=device)
    k, v = torch.randn(B, Hk, T, D, device=device), torch.randn(B, Hk, T, D, device=device)
    k_cache = torch.zeros(B, Hk, S, D, device=device).index_copy_(2, torch.arange(T, device=device), k)
    v_cache = torch.zeros(B, Hk, S, D, device=device).index_copy_(2, torch.arange(T, device=device), v)
    full = kernels.attention(q, k, v, causal=True)
    step = kernels.decode_attention(q[:, :, -1:], k_cache, v_cache, torch.tensor(T, device=device))
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_decode_attention_rejects_bad_length(device):
    q, cache = torch.randn(1, 2, 1, 16, device=device), torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="outside"):
        kernels.decode_attention(q, cache, cache, 0)
    with pytest.raises(ValueError, match=r"\(B, H, 1, D\)"):
        kernels.decode_attention(torch.randn(1, 2, 2, 16, device=device), cache, cache, 3)
