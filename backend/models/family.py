"""A model family as one record: how it is built and saved, and what it can do.

Callers ask a family's capabilities (`family(cfg).chats`, `.quants`, `.export_graph`), never compare its name: adding
a family is one module under backend/models/ that exports a `Family`, and one line in `backend/models/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str                    # ModelConfig.family
    title: str                   # what the UI and errors call it
    # what it can do
    generates: bool              # samples text token by token (the generation loop drives it)
    chats: bool                  # renders chat messages through a chat template
    fills_masks: bool            # predicts [MASK] tokens (masked LM)
    classifies: bool             # can carry a sequence-classification head
    bidirectional: bool          # attends both ways under a padding mask; its logits take an attention_mask
    kv_cache: str                # "positions": grows with the sequence; "state": fixed (h, c); "none"
    # how it is trained
    objective: str               # "next_token" (CE over the next token) or "encoder" (masked LM [+ NSP], classify)
    pretrain_tokenizer: str      # what a pretrain from scratch trains: "bpe" or "wordpiece"
    lora: bool                   # has attention projections peft can adapt
    shards: bool                 # FSDP shards its blocks
    # how it is exported
    quants: tuple[str, ...]      # ONNX weight quantisations offered
    export_graph: str            # the export/ graph builder: "causal", "gqa", "encoder", "lstm"
    hf_export: bool              # `python -m export --format hf` writes a transformers folder of it
    gguf_blocks: bool            # int4 straight from a GGUF file's own Q4 blocks
    # how it is built (cfg is a ModelConfig)
    new: Callable                # cfg -> a fresh module (random init by its init_weights)
    build: Callable              # (cfg, HF-named state, dtype, device, cpu_decode_layout) -> module, eval mode
    from_hf_state: Callable      # (HF-named state, cfg) -> our names
    to_hf_state: Callable        # (our state, cfg) -> HF names and layouts
    param_count: Callable        # cfg -> parameters, from sizes alone
    mlp_matrices: int = 2        # weight matrices per MLP (SwiGLU: 3), for the activation estimate
    gguf_tensor: Callable | None = None  # (cfg, GGUF architecture, GGUF tensor name) -> (HF name, fix); None: no GGUF

    @property
    def described(self) -> str:
        """"a Llama model", "an LSTM model": for messages."""
        return f"{'an' if self.title.startswith(('A', 'E', 'I', 'O', 'U', 'LSTM')) else 'a'} {self.title} model"

    def capabilities(self) -> dict:
        """What the UI reads from `ModelHandle.info()`: plain values only."""
        return dict(generates=self.generates, chats=self.chats, fills_masks=self.fills_masks,
                    classifies=self.classifies, attends=self.kv_cache != "state", quants=list(self.quants),
                    title=self.title)
