"""A BERT-style encoder (family "bert"): bidirectional self-attention, no KV cache, in one readable module.

    token + learned absolute position + token-type embeddings -> LayerNorm
    n_layer x post-LayerNorm block:  x = LN(x + Attn(x, padding mask));  x = LN(x + W2 GELU(W1 x))
    head: masked-LM   (dense -> GELU -> LayerNorm -> decoder tied to the token embeddings, + bias)  -> (B, T, V)
          or classify (pooler: tanh(dense(h[CLS])) -> linear)                                    -> (B, n_labels)
    + optional next-sentence head for pretraining (pooler -> linear)                         -> (B, 2)

GELU is the exact (erf) one, as BERT's `hidden_act="gelu"`. Weights load from HF `BertForMaskedLM` /
`BertForSequenceClassification` folders through `HF_NAMES` (our name -> theirs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GenerationError, ModelLoadError, UnsupportedModelError
from .family import Family

MLM_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining", "BertModel")
CLASSIFY_ARCHITECTURE = "BertForSequenceClassification"


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(3))
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)    # (B, H, T, hd); every query sees all keys
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x, key_mask):
        x = self.attn_norm(x + self.attn(x, key_mask))                         # post-LN: norm after the residual
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        if cfg.labels is None:  # masked-LM head
            self.mlm_dense = nn.Linear(d, d)
            self.mlm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
            self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
            if cfg.nsp_head:  # next-sentence prediction (BertForPreTraining's cls.seq_relationship)
                self.pooler = nn.Linear(d, d)
                self.nsp_head = nn.Linear(d, 2)
        else:                   # sequence-classification head
            self.pooler = nn.Linear(d, d)
            self.classifier = nn.Linear(d, len(cfg.labels))

    @property
    def is_classifier(self) -> bool:
        return self.config.labels is not None

    def hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> last hidden states (B, T, D); attention_mask (B, T) is 1 on tokens, 0 on padding."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise GenerationError(f"{T} tokens exceed the encoder's {self.config.max_seq_len} positions")
        pos = torch.arange(T, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.emb_norm(self.tok_emb(idx) + self.pos_emb(pos) + self.type_emb(types))  # (B, T, D)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.to(device=idx.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, key_mask)
        return x

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, nsp: bool = False):
        """Masked-LM logits (B, T, V), or class logits (B, n_labels) for a classifier; with nsp=True (a model built
        with nsp_head) the pair (masked-LM logits (B, T, V), next-sentence logits (B, 2))."""
        h = self.hidden(idx, attention_mask, token_type_ids)                    # (B, T, D)
        if self.is_classifier:
            return self.classifier(torch.tanh(self.pooler(h[:, 0])))           # (B, n_labels), from [CLS]
        mlm = self.lm_head(self.mlm_norm(F.gelu(self.mlm_dense(h)))) + self.lm_bias  # (B, T, V)
        if not nsp:
            return mlm
        if not self.config.nsp_head:
            raise GenerationError("this encoder has no next-sentence head")
        return mlm, self.nsp_head(torch.tanh(self.pooler(h[:, 0])))           # (B, 2): 0 = B follows A, 1 = random

    def init_weights(self, std: float = 0.02):
        """BERT's initialisation: normal(0, std) matrices and embeddings, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.is_classifier:
            nn.init.zeros_(self.lm_bias)

    # --- what the handle and the training loop ask of every model ---
    @classmethod
    def with_classifier(cls, encoder: "Encoder", labels: list[str], seed: int = 0) -> "Encoder":
        """A sequence classifier over `labels` sharing `encoder`'s embeddings and blocks (copied); the pooler and the
        classifier start from BERT's initialisation, as transformers does for a BertForMaskedLM folder loaded as
        BertForSequenceClassification (a masked-LM checkpoint has no pooler)."""
        import dataclasses

        cfg = dataclasses.replace(encoder.config, labels=list(labels), nsp_head=False)
        torch.manual_seed(seed)
        model = cls(cfg).to(encoder.tok_emb.weight.device)
        model.init_weights()
        body = {k: v for k, v in encoder.state_dict().items() if k.split(".")[0] in (
            "tok_emb", "pos_emb", "type_emb", "emb_norm", "blocks")}
        if encoder.is_classifier:  # a classifier given new labels keeps its pooler, not its classifier
            body.update({k: v for k, v in encoder.state_dict().items() if k.startswith("pooler.")})
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and all(k.split(".")[0] in ("pooler", "classifier") for k in missing), missing
        return model

    def eager_runner(self) -> "EncoderRunner":
        return EncoderRunner(self)

    def contiguous_layout(self) -> "Encoder":
        return self

    def free_cache(self):
        pass


class EncoderRunner:
    """The Runner of an encoder: full forwards only (no cache, no next token)."""
    name = "eager"

    def __init__(self, model: Encoder):
        self.model = model
        self.device = model.tok_emb.weight.device
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def start(self, batch: int, max_len: int) -> None:
        raise GenerationError("this is an encoder (BERT-style): it fills masks and classifies, it does not generate "
                              "text; use fill_mask or load a causal model")

    forward = start

    def full_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids.to(self.device), attention_mask).float()

    def free(self) -> None:
        pass


# --- the Hugging Face format ---
def config_from_hf(cls, hf: dict):
    """ModelConfig of an HF BERT config.json (masked-LM or sequence-classification head)."""
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedModelError(f"BERT activation {act!r} is not supported (exact gelu only)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("only absolute position embeddings are supported for BERT")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UnsupportedModelError("BERT as a decoder (is_decoder / cross-attention) is not supported")
    arch = (hf.get("architectures") or ["BertForMaskedLM"])[0]
    labels = None
    if arch == CLASSIFY_ARCHITECTURE:
        id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
    elif arch not in MLM_ARCHITECTURES:
        raise UnsupportedModelError(f"BERT head {arch!r} is not supported; Fornax runs {', '.join(MLM_ARCHITECTURES)} "
                                    f"(masked LM) and {CLASSIFY_ARCHITECTURE}")
    return cls(family="bert", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
               n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
               max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("layer_norm_eps", 1e-12),
               type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id"),
               tie_embeddings=hf.get("tie_word_embeddings", True), labels=labels, hf_model_type="bert",
               name=hf.get("_name_or_path", "") or "")


def config_to_hf(cfg) -> dict:
    arch = CLASSIFY_ARCHITECTURE if cfg.labels else "BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"
    out = dict(model_type="bert", architectures=[arch],
               vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
               num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, hidden_act="gelu",
               max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
               layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.labels:  # as transformers writes them (num_labels is implied by id2label)
        out["num_labels"] = len(cfg.labels)
        out["id2label"] = {str(i): label for i, label in enumerate(cfg.labels)}
        out["label2id"] = {label: i for i, label in enumerate(cfg.labels)}
    return out


def hf_names(cfg) -> dict[str, str]:
    """our tensor name -> the HF tensor name (a tied decoder has no entry: it is the token embedding)."""
    e = "bert.embeddings."
    names = {"tok_emb.weight": e + "word_embeddings.weight", "pos_emb.weight": e + "position_embeddings.weight",
             "type_emb.weight": e + "token_type_embeddings.weight"}
    pairs = [("emb_norm", e + "LayerNorm")]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        pairs += [(b + "attn.q", h + "attention.self.query"), (b + "attn.k", h + "attention.self.key"),
                  (b + "attn.v", h + "attention.self.value"), (b + "attn.proj", h + "attention.output.dense"),
                  (b + "attn_norm", h + "attention.output.LayerNorm"), (b + "up", h + "intermediate.dense"),
                  (b + "down", h + "output.dense"), (b + "mlp_norm", h + "output.LayerNorm")]
    if cfg.labels is None:
        pairs += [("mlm_dense", "cls.predictions.transform.dense"), ("mlm_norm", "cls.predictions.transform.LayerNorm")]
        names["lm_bias"] = "cls.predictions.bias"
        if not cfg.tie_embeddings:
            names["lm_head.weight"] = "cls.predictions.decoder.weight"
        if cfg.nsp_head:
            pairs += [("pooler", "bert.pooler.dense"), ("nsp_head", "cls.seq_relationship")]
    else:
        pairs += [("pooler", "bert.pooler.dense"), ("classifier", "classifier")]
    for ours, theirs in pairs:
        names[ours + ".weight"], names[ours + ".bias"] = theirs + ".weight", theirs + ".bias"
    return names


def from_hf_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """HF-named BERT tensors -> ours; tensors of heads we do not run (pooler of an MLM, NSP) are dropped."""
    if not any(k.startswith("bert.") for k in state):  # BertModel checkpoints lack the "bert." prefix
        state = {k if k.startswith("cls.") or k.startswith("classifier.") else "bert." + k: v for k, v in state.items()}
    names = hf_names(cfg)
    missing = [t for t in names.values() if t not in state]
    if missing:
        raise ModelLoadError(f"the weights lack {len(missing)} tensor(s) this BERT config needs, e.g. {missing[:3]}")
    out = {ours: state[theirs] for ours, theirs in names.items()}
    ignored = {"bert.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
               "bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
               "cls.seq_relationship.bias"}
    unused = sorted(set(state) - set(names.values()) - ignored)
    if unused:
        raise ModelLoadError(f"the weights have {len(unused)} tensor(s) this BERT config does not use, "
                             f"e.g. {unused[:3]}")
    return out


def to_hf_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    out = {theirs: state[ours] for ours, theirs in hf_names(cfg).items()}
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def build(cfg, state: dict[str, torch.Tensor], dtype=torch.float32, device=torch.device("cpu"),
          cpu_decode_layout: bool = True) -> Encoder:
    """An Encoder holding the given HF-named weights (shapes checked against the config). It has no decode
    layout: an encoder never runs a batch-1 decode step."""
    ours = from_hf_state(state, cfg)
    with torch.device("meta"):
        model = Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight" or
                not cfg.tie_embeddings}
    for name, shape in expected.items():
        if tuple(ours[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(ours[name].shape)} but the config implies {shape}")
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    model.load_state_dict(ours, assign=True, strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings and not model.is_classifier:
        model.lm_head.weight = model.tok_emb.weight
    model.requires_grad_(False)
    return model.eval()


def param_count(cfg) -> int:
    d, f, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
    layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    emb = (V + cfg.max_seq_len + cfg.type_vocab_size) * d + 2 * d
    if cfg.labels is not None:  # pooler + classifier
        head = d * d + d + (d + 1) * len(cfg.labels)
    else:                       # transform (dense + LayerNorm), decoder bias, an untied decoder, NSP's pooler + head
        head = d * d + 3 * d + V + (0 if cfg.tie_embeddings else V * d) + (d * d + d + 2 * d + 2) * cfg.nsp_head
    return L * layer + emb + head


ENCODER = Family(name="bert", title="BERT-style encoder", generates=False, chats=False, fills_masks=True,
                 classifies=True, bidirectional=True, kv_cache="none", objective="encoder",
                 pretrain_tokenizer="wordpiece", lora=True, shards=False, quants=("none", "int8"),
                 export_graph="encoder", hf_export=False, gguf_blocks=False, new=Encoder, build=build,
                 from_hf_state=from_hf_state, to_hf_state=to_hf_state, param_count=param_count)
