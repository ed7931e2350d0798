"""The recurrent baseline (family "lstm"): embedding -> n_layer LSTM layers -> linear, a next-token model.

It is trained by the same loop on the same packed text as the Transformer and sampled by the same generation loop and
sampler: its `LSTMRunner` keeps the LSTM state (h, c) as its cache, so a decode step reads one token and the state.
Saved as an HF-style folder with `model_type: "fornax_lstm"` (our own tensor names; transformers has no such model).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import GenerationError, ModelLoadError
from .family import Family

HF_MODEL_TYPE = "fornax_lstm"


class LSTMLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """idx (B, T) -> next-token logits (B, T, V), from a zero state (or `state`)."""
        return self.step(idx, state)[0]

    def step(self, idx: torch.Tensor, state=None):
        """idx (B, T), state (h, c) each (n_layer, B, D) or None -> logits (B, T, V), the state after idx."""
        x = self.tok_emb(idx)                                                    # (B, T, D)
        y, state = self.lstm(x, state)                                           # (B, T, D)
        return self.lm_head(y), state

    def init_weights(self, std: float = 0.02):
        """Embedding normal(0, 1) (PyTorch's default): with the Transformer's std 0.02 the gates' pre-activations are
        ~0.03, the state carries almost nothing of the input, and the LSTM sat at the unigram loss for hundreds of
        steps. Head normal(0, std); LSTM weights uniform(+-1/sqrt(D)) as PyTorch does; forget-gate bias 1
        (Jozefowicz et al. 2015: keep the state by default early in training)."""
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        self.lstm.reset_parameters()
        D = self.config.d_model
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_ih"):  # gate order i, f, g, o
                    p[D:2 * D].fill_(1.0)

    # --- what the handle and the training loop ask of every model ---
    def eager_runner(self) -> "LSTMRunner":
        return LSTMRunner(self)

    def contiguous_layout(self) -> "LSTMLM":
        return self

    def free_cache(self):
        pass


class LSTMRunner:
    """The Runner of an LSTM: its cache is the recurrent state, so positions must follow on from the last call."""
    name = "eager"

    def __init__(self, model: LSTMLM):
        self.model = model
        self.device = model.tok_emb.weight.device
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.state, self.pos = None, 0

    def memory_plan(self, max_len: int) -> dict:
        """For budget.generation_parts: the cache is the state; a prompt chunk's logits come back for every position."""
        return dict(all_prompt_logits=True)

    def start(self, batch: int, max_len: int) -> None:
        self.state, self.pos = None, 0  # None = zeros in nn.LSTM

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if pos != self.pos:
            raise GenerationError(f"an LSTM reads its tokens in order: expected position {self.pos}, got {pos}")
        logits, self.state = self.model.step(ids.to(self.device), self.state)
        self.pos += ids.shape[1]
        return logits[:, -1].float()                                             # (B, V)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device)).float()

    def free(self) -> None:
        self.state, self.pos = None, 0


# --- the HF-style folder ---
def config_from_hf(cls, hf: dict):
    return cls(family="lstm", vocab_size=hf["vocab_size"], n_layer=hf["num_layers"], d_model=hf["hidden_size"],
               max_seq_len=hf.get("max_length", 1024), tie_embeddings=hf.get("tie_word_embeddings", False),
               bos_token_id=hf.get("bos_token_id"), eos_token_ids=hf.get("eos_token_ids") or [],
               hf_model_type=HF_MODEL_TYPE, name=hf.get("_name_or_path", "") or "")


def config_to_hf(cfg) -> dict:
    return dict(model_type=HF_MODEL_TYPE, architectures=["FornaxLSTM"], vocab_size=cfg.vocab_size,
                num_layers=cfg.n_layer, hidden_size=cfg.d_model, max_length=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_ids=list(cfg.eos_token_ids))


def to_hf_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    names = [k for k in state if not (cfg.tie_embeddings and k == "lm_head.weight")]
    return {k: state[k].detach().contiguous().cpu() for k in names}


def build(cfg, state: dict[str, torch.Tensor], dtype=torch.float32, device=torch.device("cpu"),
          cpu_decode_layout: bool = True) -> LSTMLM:
    """An LSTMLM holding the given weights (saved under our own names); nn.LSTM keeps its own layout."""
    with torch.device("meta"):
        model = LSTMLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if set(state) != set(expected):
        raise ModelLoadError(f"the LSTM weights do not match its config: missing {sorted(set(expected) - set(state))[:3]}"
                             f", unused {sorted(set(state) - set(expected))[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(state[name].shape)} but the config implies {shape}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True,
                          strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.lstm.flatten_parameters()
    model.requires_grad_(False)
    return model.eval()


def from_hf_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    return dict(state)  # saved under our own names (transformers has no LSTM model)


def param_count(cfg) -> int:
    """4 gates × (input + hidden weights + two biases) per layer, the embedding, an untied head."""
    d, V = cfg.d_model, cfg.vocab_size
    return cfg.n_layer * 4 * (2 * d * d + 2 * d) + V * d * (1 if cfg.tie_embeddings else 2)


LSTM = Family(name="lstm", title="LSTM", generates=True, chats=False, fills_masks=False, classifies=False,
              bidirectional=False, kv_cache="state", objective="next_token", pretrain_tokenizer="bpe", lora=False,
              shards=False, quants=("none", "int8"), export_graph="lstm", hf_export=False, gguf_blocks=False,
              new=LSTMLM, build=build, from_hf_state=from_hf_state, to_hf_state=to_hf_state,
              param_count=param_count)
