"""Execution paths. Each is a `Runner`; one generation loop (backend/generation/generate.py) drives them all.

  eager        PyTorch eager, static KV cache                                   runners/eager.py
  compiled     torch.compile of the same model (C++/OpenMP on CPU, Triton on CUDA)  runners/compiled.py
  triton       the model with our Triton kernels swapped in (kernels/)          runners/triton.py
  compiled+triton  torch.compile of that model (CUDA graph for decode; CUDA only) runners/triton.py
  onnx-*       an ONNX export on ONNX Runtime (attached by export/attach.py)     runners/onnx.py
               (an encoder's or an LSTM's export: runners/onnx_encoder_lstm.py)

`ModelHandle.runners` holds the prepared ones; `PREPARABLE` names those a handle with PyTorch weights prepares on
first use (`ModelHandle.runner(name)`); `ModelHandle.runner_names()` lists both, for the CLI and the playground.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..errors import GenerationError


class Runner(Protocol):
    """A KV-cached forward pass. Logits come back as fp32 on `device`, where sampling then runs too."""
    name: str
    device: torch.device
    weight_bytes: int     # bytes of weights one decode step reads (for the bandwidth figure)

    def start(self, batch: int, max_len: int) -> None:
        """Prepare caches for `batch` sequences of up to `max_len` tokens; forgets earlier sequences."""

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (B, T) at positions pos..pos+T-1 -> logits of the last position (B, V)."""

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """A whole sequence without cache: ids (B, T) -> logits (B, T, V)."""

    def free(self) -> None:
        """Drop caches (the weights stay)."""


def _compiled(model, progress):
    from .compiled import CompiledRunner

    return CompiledRunner(model, progress=progress)


def _triton(model, progress):
    try:
        from .triton import TritonRunner
    except ImportError as e:
        raise GenerationError(f"the Triton backend is not available here: {e}") from e
    return TritonRunner(model)


def _compiled_triton(model, progress):
    try:
        from .triton import CompiledTritonRunner
    except ImportError as e:
        raise GenerationError(f"the compiled Triton backend is not available here: {e}") from e
    return CompiledTritonRunner(model, progress=progress)


# name -> factory(model, progress) for runners prepared on first use from a handle's PyTorch model
PREPARABLE: dict[str, Callable] = {"compiled": _compiled, "triton": _triton, "compiled+triton": _compiled_triton}


def offered(name: str) -> bool:
    """Whether a handle offers the PREPARABLE runner `name` here: `triton` where its kernels run (a GPU, or the
    interpreter in tests); `compiled+triton` on a CUDA GPU only (compiling interpreted kernels is of no use)."""
    if name == "triton":
        return triton_available()
    if name == "compiled+triton":
        return torch.cuda.is_available()
    return True


def triton_available() -> bool:
    """Triton kernels run on a CUDA GPU, or in Triton's interpreter when TRITON_INTERPRET=1 (tests)."""
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
