"""ONNX Runtime runners for the two families that are not causal Transformers: BERT-style encoders (a full forward,
no cache) and the LSTM baseline (its cache is the recurrent state, carried between calls as graph inputs/outputs).

This module owns those graphs' input/output contracts; export/encoder_graph.py and export/lstm_graph.py write to them.
  encoder  input_ids, attention_mask, token_type_ids (B, T) int64 -> logits (B, T, V), or (B, n_labels) for a
           classifier (optimum's ORTModelForMaskedLM / ORTModelForSequenceClassification names)
  lstm     input_ids (B, T) int64, h0, c0 (n_layer, B, D) float32 -> logits (B, T, V), hn, cn (n_layer, B, D)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import family
from ..models.config import ModelConfig
from ..errors import GenerationError, ModelLoadError
from .onnx import MODEL_FILE, OnnxRunner, open_session

ENCODER_INPUTS, ENCODER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids"), ("logits",)
LSTM_INPUTS, LSTM_OUTPUTS = ("input_ids", "h0", "c0"), ("logits", "hn", "cn")


def _open(path: Path, threads: int | None, inputs: tuple[str, ...], what: str):
    session = open_session(path, threads)
    missing = set(inputs) - {i.name for i in session.get_inputs()}
    if missing:
        raise ModelLoadError(f"{path.name} is not a Fornax/optimum {what} graph: it lacks inputs {sorted(missing)}")
    return session


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


class OnnxEncoderRunner:
    """An encoder export on ONNX Runtime: full forwards only, as `backend.models.encoder.EncoderRunner`."""

    def __init__(self, path: str | Path, config: ModelConfig, threads: int | None = None, name: str = "onnx"):
        self.path, self.config, self.name = Path(path), config, name
        self.session = _open(self.path, threads, ENCODER_INPUTS, "encoder")
        self.device = torch.device("cpu")
        self.weight_bytes = _file_bytes(self.path)

    def start(self, batch: int, max_len: int) -> None:
        raise GenerationError("this is an encoder (BERT-style): it fills masks and classifies, it does not generate "
                              "text; use fill_mask or load a causal model")

    forward = start

    def full_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> masked-LM logits (B, T, V) or class logits (B, n_labels)."""
        if ids.shape[1] > self.config.max_seq_len:
            raise GenerationError(f"{ids.shape[1]} tokens exceed the encoder's {self.config.max_seq_len} positions")
        ids = ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        types = np.zeros_like(ids) if token_type_ids is None else token_type_ids.cpu().numpy().astype(np.int64)
        (logits,) = self.session.run(list(ENCODER_OUTPUTS), dict(zip(ENCODER_INPUTS, (ids, mask, types))))
        return torch.from_numpy(logits)

    def free(self) -> None:
        pass


class OnnxLSTMRunner:
    """An LSTM export on ONNX Runtime. Like `backend.models.lstm.LSTMRunner`, its cache is the state (h, c): each call
    feeds the state the last one returned, so positions must follow on from the last call."""

    def __init__(self, path: str | Path, config: ModelConfig, threads: int | None = None, name: str = "onnx"):
        self.path, self.config, self.name = Path(path), config, name
        self.session = _open(self.path, threads, LSTM_INPUTS, "LSTM")
        self.device = torch.device("cpu")
        self.weight_bytes = _file_bytes(self.path)
        self.state, self.pos = None, 0

    def _zeros(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.config.n_layer, batch, self.config.d_model)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _run(self, ids: torch.Tensor, state) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        feed = dict(zip(LSTM_INPUTS, (ids.cpu().numpy().astype(np.int64), *state)))
        logits, h, c = self.session.run(list(LSTM_OUTPUTS), feed)                # (B, T, V), (L, B, D) x 2
        return logits, (h, c)

    def memory_plan(self, max_len: int) -> dict:
        return dict(all_prompt_logits=True)  # for budget.generation_parts: every position's logits per call

    def start(self, batch: int, max_len: int) -> None:
        self.state, self.pos = self._zeros(batch), 0

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if pos != self.pos or self.state is None:
            raise GenerationError(f"an LSTM reads its tokens in order: expected position {self.pos}, got {pos}")
        logits, self.state = self._run(ids, self.state)
        self.pos += ids.shape[1]
        return torch.from_numpy(np.ascontiguousarray(logits[:, -1]))             # (B, V)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(ids, self._zeros(ids.shape[0]))[0])    # (B, T, V), from a zero state

    def free(self) -> None:
        self.state, self.pos = None, 0


def onnx_runner(folder: str | Path, config: ModelConfig, threads: int | None = None, name: str = "onnx"):
    """The runner of an export folder, by the graph its family exports."""
    cls = {"encoder": OnnxEncoderRunner, "lstm": OnnxLSTMRunner}.get(family(config).export_graph, OnnxRunner)
    return cls(Path(folder) / MODEL_FILE, config, threads=threads, name=name)
