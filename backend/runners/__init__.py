"""Execution paths. Each is a `Runner`; one generation loop (backend/generation/generate.py) drives them all.

  eager        PyTorch eager, static KV cache                                   runners/eager.py
  compiled     torch.compile of the same model (C++/OpenMP on CPU, Triton on CUDA)  runners/compiled.py
  triton       the model with our Triton kernels swapped in (kernels/)          runners/triton.py
  compiled+triton  torch.compile of that model (CUDA graph for decode; CUDA only) runners/triton.py
  native       the whole forward pass in C over a GGUF file's Q4_1 / Q8_0 blocks (CPU)  runners/native.py
  onnx-*       an ONNX export on ONNX Runtime (attached by export/attach.py)     runners/onnx.py
               (an encoder's or an LSTM's export: runners/onnx_encoder_lstm.py)

`ModelHandle.runners` holds the prepared ones; `PREPARABLE` names those a handle with PyTorch weights prepares on
first use (`ModelHandle.runner(name)`); `ModelHandle.runner_names()` lists both, for the CLI and the playground.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import GenerationError
from ..generation.runner import Runner  # noqa: F401 -- the protocol every runner here meets


def _compiled(model, progress, gguf=None):
    from .compiled import CompiledRunner

    return CompiledRunner(model, progress=progress)


def _triton(model, progress, gguf=None):
    try:
        from .triton import TritonRunner
    except ImportError as e:
        raise GenerationError(f"the Triton backend is not available here: {e}") from e
    return TritonRunner(model)


def _compiled_triton(model, progress, gguf=None):
    try:
        from .triton import CompiledTritonRunner
    except ImportError as e:
        raise GenerationError(f"the compiled Triton backend is not available here: {e}") from e
    return CompiledTritonRunner(model, progress=progress)


def _native(model, progress, gguf=None):
    if gguf is None:
        raise GenerationError("the native CPU path runs a model loaded from a GGUF file (Q4_0, Q4_1 or Q8_0 blocks)")
    from .native import NativeRunner

    return NativeRunner(model, gguf, progress)


# name -> factory(model, progress, gguf=the handle's GGUF file) for runners prepared on first use from a handle's
# PyTorch model
PREPARABLE: dict[str, Callable] = {"compiled": _compiled, "triton": _triton, "compiled+triton": _compiled_triton,
                                   "native": _native}


def offered(name: str, gguf=None, family=None) -> bool:
    """Whether a handle offers the PREPARABLE runner `name` here: `triton` where its kernels run (a GPU, or the
    interpreter in tests); `compiled+triton` on a CUDA GPU only (compiling interpreted kernels is of no use);
    `native` for a Llama-family model (`family`, a Family record) loaded from a GGUF file, where a C compiler is
    (whether its blocks suit it is found when it is prepared)."""
    if name == "native":
        from .native import compiler_present

        return gguf is not None and family is not None and family.gguf_blocks and compiler_present()
    if name == "triton":
        return triton_available()
    if name == "compiled+triton":
        return torch.cuda.is_available()
    return True


def triton_available() -> bool:
    """Triton kernels run on a CUDA GPU, or in Triton's interpreter when TRITON_INTERPRET=1 (tests)."""
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
