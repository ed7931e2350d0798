"""Llama-family graphs whose attention is onnxruntime's fused GroupQueryAttention contrib op.

One GQA node per layer does the rotary embedding, the K/V cache concatenation and grouped-query attention that
otherwise take ~40 small ONNX nodes; at batch 1 those small nodes, not the weights, dominate decode time.
Each residual add and the RMSNorm after it are one SkipSimplifiedLayerNormalization node, and SwiGLU's gate/up
split has constant sizes: ~300 fewer nodes than the plain trace, each a few microseconds per decoded token.
Same graph interface as the generic export (optimum's names and layout, position_ids included, BNSH past/present),
but GQA derives positions from the mask (seqlens_k) as before and position_ids is an input for optimum's sake.
Rows must be unpadded or right-padded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from backend.models.transformer import Transformer
from backend.models.ops import rms_norm, rotate_half

from .graph import LastPositions


def _typed(outputs, *like):
    """Give a contrib op's outputs the element type of an input and their rank, sizes left open: the exporter then
    knows their types (no "shape inference ... is missing" warning per node) without guessing a wrong shape."""
    for out, (ref, rank) in zip(outputs, like):
        out.setType(ref.type().with_sizes([None] * rank))
    return tuple(outputs)


class GroupQueryAttention(torch.autograd.Function):
    """PyTorch reference of com.microsoft.GroupQueryAttention (no padding), exported as that one node."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, n_head: int, n_kv_head: int,
                scale: float):
        B, T, _ = q.shape
        P, hd = past_k.shape[2], past_k.shape[3]
        q = q.view(B, T, n_head, hd).transpose(1, 2)                 # (B, nh, T, hd)
        k = k.view(B, T, n_kv_head, hd).transpose(1, 2)              # (B, nkv, T, hd)
        v = v.view(B, T, n_kv_head, hd).transpose(1, 2)
        rope = torch.cat([cos, cos], -1)[P:P + T], torch.cat([sin, sin], -1)[P:P + T]  # (T, hd)
        q, k = rotate_half(q, *rope), rotate_half(k, *rope)
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)  # (B, nkv, P + T, hd)
        mask = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)
        reps = n_head // n_kv_head
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1),
                                           attn_mask=mask, scale=scale)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, n_head * hd), k, v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, n_head, n_kv_head, scale):
        outs = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin,
                    num_heads_i=n_head, kv_num_heads_i=n_kv_head, scale_f=scale, do_rotary_i=1,
                    rotary_interleaved_i=0, outputs=3)
        return _typed(outs, (q, 3), (past_k, 4), (past_v, 4))


class SkipRMSNorm(torch.autograd.Function):
    """x + skip and its RMSNorm in one com.microsoft.SkipSimplifiedLayerNormalization node: the residual add of
    every block's two halves, fused with the norm that follows it. Returns (normed, x + skip)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps: float):
        s = x + skip
        return rms_norm(s, weight, eps), s

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        out = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps, outputs=4)
        return _typed((out[0], out[3]), (x, 3), (x, 3))  # outputs: normed, mean, inverse std (unused), x + skip


class GqaGraph(torch.nn.Module):
    """Flat inputs/outputs like export.graph.GraphWrapper, for Llama-family models."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        half = model.config.head_dim // 2
        cos, sin = model.rope_tables(model.config.max_seq_len)  # the graph serves any position of the context
        self.register_buffer("cos_cache", cos[:, :half].clone(), persistent=False)  # (S, hd/2)
        self.register_buffer("sin_cache", sin[:, :half].clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past_flat_and_keep):
        *past_flat, logits_to_keep = past_flat_and_keep
        m, cfg = self.model, self.model.config
        nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # (B,) index of each row's last token. position_ids only rides along (times 0) so the graph keeps optimum's
        # input (the exporter drops unused inputs); positions come from the mask, as GQA's cache writes do
        seqlens_k = (attention_mask.sum(-1) - 1 + 0 * position_ids[:, 0]).to(torch.int32)
        total_len = torch._shape_as_tensor(attention_mask)[1].to(torch.int32)      # traced as Shape, not a constant
        x = m.tok_emb(input_ids)                                             # (B, T, d)
        h = m.blocks[0].attn_norm(x)
        present = []
        for i, block in enumerate(m.blocks):
            a = block.attn
            q, k, v = a.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            y, pk, pv = GroupQueryAttention.apply(q, k, v, past_flat[2 * i], past_flat[2 * i + 1], seqlens_k,
                                                  total_len, self.cos_cache, self.sin_cache, nh, nkv, 1 / math.sqrt(hd))
            present += [pk, pv]
            h, x = SkipRMSNorm.apply(a.proj(y), x, block.mlp_norm.weight, block.mlp_norm.eps)
            gate, up = block.mlp.gate_up(h).split([cfg.d_ff, cfg.d_ff], dim=-1)  # constant sizes: one Split node
            nxt = m.blocks[i + 1].attn_norm if i + 1 < len(m.blocks) else m.norm
            h, x = SkipRMSNorm.apply(block.mlp.down(F.silu(gate) * up), x, nxt.weight, nxt.eps)
        return (m.lm_head(LastPositions.apply(h, logits_to_keep)), *present)


def pack_qkv(graph) -> int:
    """Feed each GroupQueryAttention node the packed Q|K|V projection itself (key and value inputs left empty, as
    the op allows) instead of the three outputs of a Split of it: one node fewer per layer, for every decoded token.
    Works on the exported onnx GraphProto in place; returns how many Splits went."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    gone = []
    for node in graph.node:
        split = producer.get(node.input[0]) if node.op_type == "GroupQueryAttention" else None
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]) or \
                any(consumers.get(out) != 1 for out in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        gone.append(split)
    for split in gone:
        graph.node.remove(split)
    return len(gone)
