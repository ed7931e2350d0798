"""One ModelConfig for every model Fornax runs: GPT-2 family and Llama family (Llama, Mistral, Qwen2, SmolLM), BERT-style
encoders (backend/models/encoder.py) and the LSTM baseline (backend/models/lstm.py)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from ..errors import ModelLoadError, UnsupportedModelError

FAMILIES = ("gpt2", "llama", "bert", "lstm")
# HF `model_type` -> our family. Qwen2 is Llama with QKV bias; Mistral is Llama.
HF_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert",
                  "fornax_lstm": "lstm"}
# GGUF `general.architecture` -> our family.
GGUF_ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}


@dataclass
class ModelConfig:
    family: str = "llama"            # "gpt2": LayerNorm, GELU, learned positions; "llama": RMSNorm, RoPE, SwiGLU
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None     # < n_head means grouped-query attention
    d_model: int = 64
    d_ff: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...} as in HF configs
    qkv_bias: bool = False
    out_bias: bool = False            # bias on the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_model_type: str | None = None  # what to write back as `model_type` in config.json
    name: str = ""
    # encoders (family "bert") only
    type_vocab_size: int = 2          # token-type (segment) embeddings
    pad_token_id: int | None = None
    labels: list[str] | None = None   # None: masked-LM head; else a sequence-classification head over these labels
    nsp_head: bool = False            # masked-LM + next-sentence heads (saved as BertForPreTraining); pretraining only

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"unknown model family {self.family!r}; Fornax runs {', '.join(FAMILIES)}")
        self.name = "" if self.name is None else str(self.name)  # a file may declare any type (GGUF general.name)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None and _is_int(self.d_model):
            self.d_ff = 4 * self.d_model
        check_config_values(self)  # before any value is divided by or sized from
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ModelLoadError(f"the model width {self.d_model} is not divisible by its {self.n_head} heads")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise UnsupportedModelError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        limits.check(self.n_params, limits.current().max_model_params, "the model's parameter count (from its config)")
        if self.hf_model_type is None:
            self.hf_model_type = self.family
        if self.family == "gpt2":  # GPT-2 has biases everywhere
            self.qkv_bias = self.out_bias = self.mlp_bias = True

    # --- derived ---
    @property
    def n_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_head + 2 * self.n_kv_head) + self.n_head * hd * d
        mlp = (3 if self.family == "llama" else 2) * d * f
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * d if self.family == "gpt2" else 0
        norms = (2 * self.n_layer + 1) * d * (2 if self.family == "gpt2" else 1)  # LayerNorm has a bias, RMSNorm not
        biases = (self.qkv_bias * hd * (self.n_head + 2 * self.n_kv_head) + self.out_bias * d
                  + self.mlp_bias * ((mlp // (d * f) - 1) * f + d))
        return self.n_layer * (attn + mlp + biases) + emb + pos + norms

    # --- serialisation ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of `to_dict`; a key that is not a ModelConfig field is refused, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UnsupportedModelError(f"unknown model config key(s): {', '.join(map(str, unknown))}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict."""
        model_type = hf.get("model_type")
        family = HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; Fornax runs {', '.join(sorted(HF_MODEL_TYPES))}")
        if family in ("bert", "lstm"):  # their own modules read and write their configs
            from . import encoder, lstm

            return (encoder if family == "bert" else lstm).config_from_hf(cls, hf)
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        common = dict(family=family, vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                      eos_token_ids=eos, hf_model_type=model_type, name=hf.get("_name_or_path", "") or "")
        if family == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise UnsupportedModelError("GPT-2 variants with scale_attn_by_inverse_layer_idx / "
                                            "reorder_and_upcast_attn are not supported")
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise UnsupportedModelError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
            return cls(**common, n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
                       d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf["n_positions"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=hf.get("tie_word_embeddings", True))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"activation {act!r} is not supported (silu only)")
        if model_type == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < hf.get(
                "max_position_embeddings", 0):
            raise UnsupportedModelError("sliding-window attention is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
        bias = bool(hf.get("attention_bias", False))
        return cls(**common, n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   n_kv_head=hf.get("num_key_value_heads"), d_model=hf["hidden_size"],
                   d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                   max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=float(theta), rope_scaling=None if rope_type == "default" else rope,
                   qkv_bias=bias or model_type == "qwen2", out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tied: bool) -> "ModelConfig":
        """Build from GGUF key/values (`general.architecture`, `llama.block_count`, ...)."""
        arch = meta.get("general.architecture")
        family = GGUF_ARCHITECTURES.get(arch)
        if family is None:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; Fornax runs {', '.join(sorted(GGUF_ARCHITECTURES))}")

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_head = get("attention.head_count")
        d_model = get("embedding_length")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        scaling = get("rope.scaling.type")
        rope_scaling = {"rope_type": scaling, "factor": get("rope.scaling.factor")} if scaling == "linear" else None
        if scaling not in (None, "none", "linear"):
            raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
        return cls(family=family, vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
                   n_layer=get("block_count"), n_head=n_head, n_kv_head=get("attention.head_count_kv", n_head),
                   d_model=d_model, d_ff=get("feed_forward_length"), head_dim=get("attention.key_length"),
                   max_seq_len=get("context_length", 2048),
                   norm_eps=get("attention.layer_norm_rms_epsilon", get("attention.layer_norm_epsilon", 1e-5)),
                   rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
                   qkv_bias=arch == "qwen2", tie_embeddings=tied,
                   bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=[] if eos is None else [eos], hf_model_type=arch,
                   name=meta.get("general.name", ""))

    def to_hf_config(self) -> dict:
        """The `config.json` transformers would write for this model (used for caches and saved checkpoints)."""
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
        if self.family in ("bert", "lstm"):
            from . import encoder, lstm

            return (encoder if self.family == "bert" else lstm).config_to_hf(self)
        if self.family == "gpt2":
            return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                        n_layer=self.n_layer, n_head=self.n_head, n_embd=self.d_model, n_inner=self.d_ff,
                        n_positions=self.max_seq_len, layer_norm_epsilon=self.norm_eps,
                        activation_function="gelu_new", tie_word_embeddings=self.tie_embeddings,
                        bos_token_id=self.bos_token_id, eos_token_id=eos)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        model_type = self.hf_model_type if self.hf_model_type in arch else "llama"
        if model_type == "qwen2" and (self.out_bias or not self.qkv_bias):
            model_type = "llama"
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        out = dict(model_type=model_type, architectures=[arch[model_type]], vocab_size=self.vocab_size,
                   num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                   num_key_value_heads=self.n_kv_head, hidden_size=self.d_model, intermediate_size=self.d_ff,
                   head_dim=self.head_dim, max_position_embeddings=self.max_seq_len, rms_norm_eps=self.norm_eps,
                   rope_theta=self.rope_theta, rope_parameters=rope, hidden_act="silu",
                   tie_word_embeddings=self.tie_embeddings, bos_token_id=self.bos_token_id, eos_token_id=eos)
        if model_type == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
            if self.qkv_bias != self.out_bias:
                raise UnsupportedModelError("a Llama config cannot express QKV bias without output bias")
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config_values(cfg: ModelConfig) -> None:
    """Refuse sizes no model can have, or that are over this deployment's caps, before anything is built from them
    (a head count of 0 divides by zero; a declared context of 2^28 would size tables; a vocabulary of 10^12 rows)."""
    caps = limits.current()
    for name, lo in (("vocab_size", 1), ("n_layer", 1), ("n_head", 1), ("n_kv_head", 1), ("d_model", 1),
                     ("d_ff", 1), ("head_dim", 1), ("max_seq_len", 1)):
        v = getattr(cfg, name)
        if v is None and name == "head_dim":
            continue
        if not _is_int(v) or v < lo:
            raise ModelLoadError(f"the model config's {name} must be a whole number >= {lo}, got {v!r}")
        if v > 1 << 24 and name not in ("vocab_size", "max_seq_len"):
            raise ModelLoadError(f"the model config's {name} = {v:,} is not a size any model has")
    limits.check(cfg.max_seq_len, caps.max_context, "the model's context length")
    limits.check(cfg.vocab_size, caps.max_vocab, "the model's vocabulary size")
    limits.check(cfg.n_layer, caps.max_layers, "the model's number of layers")
    for name in ("norm_eps", "rope_theta"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise ModelLoadError(f"the model config's {name} must be a positive number, got {v!r}")
    if cfg.n_kv_head > cfg.n_head:
        raise ModelLoadError(f"the model config has more key/value heads ({cfg.n_kv_head}) than heads ({cfg.n_head})")


# Named presets. The tiny ones are for tests and for pretraining from scratch on a CPU.
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(family="llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=172,
                       max_seq_len=256),
    "tiny-gpt2": dict(family="gpt2", vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=256,
                      tie_embeddings=True),
    "small-llama": dict(family="llama", vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024,
                        max_seq_len=512, tie_embeddings=True),
    "gpt2": dict(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                 tie_embeddings=True),
    "tiny-bert": dict(family="bert", vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=256, max_seq_len=128,
                      norm_eps=1e-12, tie_embeddings=True),
    "tiny-lstm": dict(family="lstm", vocab_size=512, n_layer=1, d_model=256, max_seq_len=1024),
    "smollm2-135m": dict(family="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                         d_ff=1536, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True),
    # the shapes of the race's synthetic models (backend/bench/synthetic.py)
    "smollm2-360m": dict(family="llama", vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, d_model=960,
                         d_ff=2560, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True),
    "llama-3.2-1b": dict(family="llama", vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                         d_ff=8192, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
