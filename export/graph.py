"""The exported graph's forward: our Transformer's blocks with explicit positions, a padding mask and past keys/values
in, logits and present keys/values out (optimum's interface). Export-only; the model itself knows none of it.

Graph interface (the one optimum's ORTModelForCausalLM reads):
  inputs  input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
          past_key_values.{i}.key / .value (B, n_kv_heads, P, head_dim) float32,
          logits_to_keep (1,) int64, optional (default 0: every position)
  outputs logits (B, S, V) float32 — (B, k, V) for the last k positions when logits_to_keep = k > 0 —,
          present.{i}.key / .value (B, n_kv_heads, P+S, head_dim)
One graph serves prefill (P = 0) and decode (S = 1). The runner's side of this contract is
`backend.runners.onnx.io_names`. logits_to_keep = 1 is what a prompt needs: the output layer on its last position
only (at 128 prompt tokens, the other 127 rows of the output layer were ~1/6 of a small model's prefill).
"""
from __future__ import annotations

import torch

from backend.models.transformer import Transformer


class LastPositions(torch.autograd.Function):
    """x[:, -k:] for k > 0, else all of x: the rows the output layer runs on. One Neg + Slice in the graph, so the
    count stays an input (a Python slice would be traced as a constant)."""

    @staticmethod
    def forward(ctx, x, keep):
        k = int(keep.reshape(-1)[0])
        return x[:, max(x.shape[1] - k, 0):] if k > 0 else x  # k > T: all of x, as Slice clamps

    @staticmethod
    def symbolic(g, x, keep):
        end = g.op("Constant", value_t=torch.tensor([2**63 - 1]))
        return g.op("Slice", x, g.op("Neg", keep), end, g.op("Constant", value_t=torch.tensor([1])))


class PastKV:
    """Cache for graph export: past (B, nkv, P, hd) in, present (B, nkv, P + T, hd) out by concatenation."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


def forward_with_past(model: Transformer, idx: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]],
                      logits_to_keep: torch.Tensor | None = None):
    """idx, position_ids (B, T); attention_mask (B, P + T) with 1 for real tokens; past [(k, v)] per layer
    -> logits (B, T, V) (the last k positions for logits_to_keep = [k > 0]), present [(k, v)] per layer."""
    B, T = idx.shape
    P = past[0][0].shape[2]
    x = model.tok_emb(idx)                                                 # (B, T, d)
    rope = None
    if model.pos_emb is not None:
        x = x + model.pos_emb(position_ids)
    else:
        cos, sin = model.rope_tables(model.config.max_seq_len)
        rope = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)  # (B, 1, T, hd)
    keys = torch.arange(P + T, device=idx.device)
    queries = torch.arange(T, device=idx.device) + P
    causal = keys[None, :] <= queries[:, None]                             # (T, P + T)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P + T)
    allowed = allowed | (keys[None, :] == queries[:, None])[None, None]    # a padded query still sees itself
    # additive float mask, built once for all layers (a boolean one is converted again in every layer's graph)
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
    caches = [PastKV(k, v) for k, v in past]
    for block, cache in zip(model.blocks, caches):
        x = block(x, rope, None, cache, mask)
    if logits_to_keep is not None:
        x = LastPositions.apply(x, logits_to_keep)
    return model.lm_head(model.norm(x)), [(c.k, c.v) for c in caches]


class GraphWrapper(torch.nn.Module):
    """Flat tensors in and out, as an ONNX graph needs them."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat_and_keep):
        *past_flat, keep = past_flat_and_keep
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, present = forward_with_past(self.model, input_ids, position_ids, attention_mask, past, keep)
        return (logits, *[t for kv in present for t in kv])
