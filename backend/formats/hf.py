"""The Hugging Face folder format: one table of weight names (HF <-> ours, read in both directions) and the one
writer of an HF-style folder (config.json, generation_config.json, tokenizer files, model.safetensors)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..errors import ModelLoadError
from .tokenizer import Tokenizer


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
    if cfg.family in ("bert", "lstm"):  # their own modules hold their name tables
        from ..models import encoder, lstm

        return (encoder if cfg.family == "bert" else lstm).to_hf_state(state, cfg)
    out = {}
    for w in weight_table(cfg):
        t = state[w.ours].t() if w.transpose else state[w.ours]
        out.update(zip(w.theirs, t.split(list(w.sizes)) if w.sizes else (t,)))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def write_hf_folder(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, hf_state: dict[str, torch.Tensor] | None,
                    config_extra: dict | None = None) -> None:
    """Write config.json (with `config_extra` merged in), generation_config.json, the tokenizer files and, when
    `hf_state` (HF names) is given, model.safetensors into `folder` — an HF-style folder `load` and transformers read.
    Atomicity is the caller's: write into `atomic_folder(...)`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if hf_state is not None:
        save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf_config(), **(config_extra or {})}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}, indent=2))
    tokenizer.save(folder)
