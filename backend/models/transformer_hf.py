"""The Transformer family (GPT-2, Llama) beside its module: the HF weight table (ours <-> theirs, read both ways),
the GGUF tensor names, building a model from HF-named weights, and the two `Family` records."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from .config import ModelConfig
from .family import Family
from .transformer import Transformer


@dataclass(frozen=True)
class Weight:
    """One of our tensors and the HF tensors it is made of."""
    ours: str                         # "blocks.3.attn.qkv.weight"
    theirs: tuple[str, ...]           # HF names, joined along dim 0 (Q/K/V, gate/up) when more than one
    sizes: tuple[int, ...] = ()       # rows of each HF part (to split ours back); () for a single part
    transpose: bool = False           # GPT-2's Conv1D stores (in, out); our Linear holds (out, in)


def weight_table(cfg: ModelConfig) -> list[Weight]:
    """Every tensor our Transformer holds for `cfg` (lm_head only when untied), with its HF names."""
    table = []
    if cfg.family == "gpt2":
        table += [Weight("tok_emb.weight", ("transformer.wte.weight",)),
                  Weight("pos_emb.weight", ("transformer.wpe.weight",))]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, conv in (("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False),
                                       ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                                       ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
                table += [Weight(b + ours + ".weight", (h + theirs + ".weight",), transpose=conv),
                          Weight(b + ours + ".bias", (h + theirs + ".bias",))]
        table += [Weight("norm.weight", ("transformer.ln_f.weight",)), Weight("norm.bias", ("transformer.ln_f.bias",))]
    else:
        table.append(Weight("tok_emb.weight", ("model.embed_tokens.weight",)))
        qkv = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            table += [Weight(b + "attn_norm.weight", (h + "input_layernorm.weight",)),
                      Weight(b + "mlp_norm.weight", (h + "post_attention_layernorm.weight",))]
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                qkv_names = tuple(h + f"self_attn.{p}_proj.{kind}" for p in "qkv")
                table.append(Weight(b + f"attn.qkv.{kind}", qkv_names, qkv))
            for kind in ("weight", "bias") if cfg.out_bias else ("weight",):
                table.append(Weight(b + f"attn.proj.{kind}", (h + f"self_attn.o_proj.{kind}",)))
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                table += [Weight(b + f"mlp.gate_up.{kind}", (h + f"mlp.gate_proj.{kind}", h + f"mlp.up_proj.{kind}"),
                                 (cfg.d_ff, cfg.d_ff)),
                          Weight(b + f"mlp.down.{kind}", (h + f"mlp.down_proj.{kind}",))]
        table.append(Weight("norm.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        table.append(Weight("lm_head.weight", ("lm_head.weight",)))
    return table


def ignored_hf_names(cfg: ModelConfig) -> set[str]:
    """HF tensors that hold nothing we need: old causal-mask and rotary buffers, a tied head's copy."""
    if cfg.family == "gpt2":
        names = {f"transformer.h.{i}.attn.{buf}" for i in range(cfg.n_layer) for buf in ("bias", "masked_bias")}
    else:
        names = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layer)}
    return names | ({"lm_head.weight"} if cfg.tie_embeddings else set())


def hf_to_fornax(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours: join Q/K/V and gate/up, transpose GPT-2's Conv1D weights."""
    if cfg.family == "gpt2":  # GPT2Model checkpoints lack GPT2LMHeadModel's "transformer." prefix
        state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in state.items()}
    else:
        state = dict(state)
    missing = [n for w in weight_table(cfg) for n in w.theirs if n not in state]
    if missing:
        raise ModelLoadError(f"the weights lack {len(missing)} tensor(s) this config needs, e.g. {missing[:3]}")
    out = {}
    for w in weight_table(cfg):
        parts = [state.pop(n) for n in w.theirs]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[w.ours] = t.t().contiguous() if w.transpose else t
    for name in ignored_hf_names(cfg):
        state.pop(name, None)
    if state:
        raise ModelLoadError(f"the weights have {len(state)} tensor(s) this config does not use, "
                             f"e.g. {list(state)[:3]}")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def fornax_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_fornax: our tensor names -> the names (and layouts) transformers uses."""
    out = {}
    for w in weight_table(cfg):
        t = state[w.ours].t() if w.transpose else state[w.ours]
        out.update(zip(w.theirs, t.split(list(w.sizes)) if w.sizes else (t,)))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32,
                device: torch.device = torch.device("cpu"), cpu_decode_layout: bool = True) -> Transformer:
    """Our Transformer holding the given HF-named weights (no random init, no extra copies)."""
    ours = hf_to_fornax(state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if tuple(ours[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(ours[name].shape)} but the config implies {shape}")
    column_major = _decode_layout_names(model, cfg) if torch.device(device).type == "cpu" and cpu_decode_layout \
        else set()
    for name in [k for k in ours if not (cfg.tie_embeddings and k == "lm_head.weight")]:
        # one tensor at a time, replaced in place: the dtype copy and the decode layout never double the weights
        v = ours[name].to(device=device, dtype=dtype)
        ours[name] = v.t().contiguous().t() if name in column_major and v.is_contiguous() else v
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    model.load_state_dict(ours, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_buffers(device)
    model.requires_grad_(False)
    if torch.device(device).type == "cpu" and cpu_decode_layout:
        model.decode_layout()
    return model.eval()


def _decode_layout_names(model: Transformer, cfg: ModelConfig) -> set[str]:
    """The weights `Transformer.decode_layout` stores column-major (every Linear's; a tied embedding with them)."""
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if cfg.tie_embeddings and "lm_head.weight" in names:
        names.add("tok_emb.weight")
    return names


# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.` / `transformer.h.N.`), per family.
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
             "output": "lm_head"}


def gguf_tensor(cfg: ModelConfig, arch: str, gguf_name: str) -> tuple[str, str | None]:
    """A GGUF tensor name ("blk.3.attn_q.weight") -> (its HF name, the fix its values need: "rope_q" / "rope_k"
    (llama.cpp permutes Llama's Q and K rows for its rotary layout), "transpose" (HF GPT-2's Conv1D is (in, out))
    or None)."""
    llama = cfg.family == "llama"
    block_map, top_map = (_LLAMA_BLOCK, _LLAMA_TOP) if llama else (_GPT2_BLOCK, _GPT2_TOP)
    base, _, kind = gguf_name.rpartition(".")   # "blk.3.attn_q", "weight"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in block_map:
        name = f"{'model.layers' if llama else 'transformer.h'}.{parts[1]}.{block_map[parts[2]]}.{kind}"
    elif base in top_map:
        name = f"{top_map[base]}.{kind}"
    else:
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no place in a {arch} model")
    fix = None
    if arch == "llama" and parts[-1] in ("attn_q", "attn_k"):
        fix = "rope_q" if parts[-1] == "attn_q" else "rope_k"
    elif not llama and kind == "weight" and parts[-1] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        fix = "transpose"
    return name, fix


def _family(name: str, title: str, export_graph: str, gguf_blocks: bool, mlp_matrices: int) -> Family:
    return Family(name=name, title=title, generates=True, chats=True, fills_masks=False, classifies=False,
                  bidirectional=False, kv_cache="positions", objective="next_token", pretrain_tokenizer="bpe",
                  lora=True, shards=True, quants=("none", "int8", "int4"), export_graph=export_graph, hf_export=True,
                  gguf_blocks=gguf_blocks, new=Transformer, build=build, from_hf_state=hf_to_fornax,
                  to_hf_state=fornax_to_hf, param_count=lambda cfg: cfg.n_params, mlp_matrices=mlp_matrices,
                  gguf_tensor=gguf_tensor)


GPT2 = _family("gpt2", "GPT-2", export_graph="causal", gguf_blocks=False, mlp_matrices=2)
# Llama's export uses onnxruntime's GroupQueryAttention; its int4 can reuse a GGUF file's own Q4 blocks
LLAMA = _family("llama", "Llama", export_graph="gqa", gguf_blocks=True, mlp_matrices=3)
