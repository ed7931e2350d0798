"""The LSTM baseline (backend/models/lstm.py) as one ONNX graph with its state as inputs and outputs, and its parity report.

Graph (the contract of backend/runners/onnx_encoder_lstm.py):
  inputs  input_ids (B, T) int64, h0, c0 (n_layer, B, D) float32 — zeros for a fresh sequence
  outputs logits (B, T, V), hn, cn (n_layer, B, D) — fed back as h0, c0 for the next tokens
One graph serves the prompt (T tokens) and each decode step (T = 1), as the KV-cache graph does for a Transformer.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from backend.handle import ModelHandle
from backend.models.lstm import LSTMLM
from backend.runners.onnx_encoder_lstm import LSTM_INPUTS, LSTM_OUTPUTS, OnnxLSTMRunner
from backend.formats.tokenizer import Tokenizer

TEXT_TOKENS = 128
GREEDY_TOKENS = 64


class LSTMGraph(torch.nn.Module):
    def __init__(self, model: LSTMLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, h0, c0):
        logits, (hn, cn) = self.model.step(input_ids, (h0, c0))
        return logits, hn, cn


def export_lstm(model: LSTMLM, path: Path, opset: int) -> None:
    """torch.onnx.export (TorchScript exporter: nn.LSTM becomes ONNX LSTM nodes) with dynamic batch and sequence."""
    cfg = model.config
    B, T = 2, 3  # example sizes; every axis below is dynamic
    state = torch.zeros(cfg.n_layer, B, cfg.d_model)
    example = (torch.randint(0, cfg.vocab_size, (B, T)), state, state.clone())
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({name: {1: "batch_size"} for name in ("h0", "c0", "hn", "cn")})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "LSTM with a batch size other than 1": ours sets h0/c0 itself
        torch.onnx.export(LSTMGraph(model), example, str(path), input_names=list(LSTM_INPUTS),
                          output_names=list(LSTM_OUTPUTS), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


@torch.inference_mode()
def verify_lstm(folder: Path, model: LSTMLM, tokenizer: Tokenizer, text: str) -> dict:
    """Eager vs the export: logits over the fixed text from a zero state, the same text read in pieces with the
    state carried through the graph's outputs, and greedy decoding through the shared generation loop."""
    runner = OnnxLSTMRunner(Path(folder) / "model.onnx", model.config)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)[:TEXT_TOKENS]])  # (1, T)
    ref, got = model(ids).float(), runner.full_logits(ids).float()           # (1, T, V)
    runner.start(1, ids.shape[1])
    T, prompt = ids.shape[1], min(16, ids.shape[1] - 1)
    stepped = [runner.forward(ids[:, :prompt], 0)]                           # a prompt, then one token a step
    stepped += [runner.forward(ids[:, t:t + 1], t) for t in range(prompt, T)]
    carried = (torch.stack(stepped, 1) - ref[:, prompt - 1:]).abs().max().item()
    handle = ModelHandle(model, tokenizer, "verify", runners={"onnx": runner})
    greedy = {name: handle.generate(ids[0, :prompt].tolist(), backend=name, max_new_tokens=GREEDY_TOKENS,
                                    temperature=0, ignore_eos=True).completions[0].token_ids
              for name in ("eager", "onnx")}
    match = next((i for i, (a, b) in enumerate(zip(greedy["eager"], greedy["onnx"])) if a != b), GREEDY_TOKENS)
    return {"kind": "lstm", "positions": T, "max_abs_logit_diff": (ref - got).abs().max().item(),
            "max_abs_logit_diff_state_carried": carried,
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "greedy_match_length": match, "greedy_tokens": GREEDY_TOKENS}
