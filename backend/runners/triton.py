"""The model with our Triton kernels swapped in (`kernels/`): the eager runner over `kernels.patch(model)`, and the
compiled runner over it (`compiled+triton`: torch.compile traces through the kernels' `torch.library` ops, inductor
fuses what lies between them, and the decode step is a CUDA graph).

Every module that runs an op through `self.ops` (norms, rotary, attention, decode attention, SwiGLU / GELU) calls
the Triton kernel instead; matmuls stay cuBLAS. The patched copy shares the model's weights. Needs a CUDA GPU, or
Triton's interpreter (TRITON_INTERPRET=1 set before `kernels` is imported; CPU tensors; tests only: it is slow).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..errors import GenerationError
from ..models.transformer import Transformer
from .compiled import CompiledRunner
from .eager import EagerRunner


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def patched_model(model: Transformer) -> Transformer:
    """`kernels.patch(model)` after checking the kernels can run where the model is (its caches not copied)."""
    device = model.tok_emb.weight.device
    if not _interpreting():
        if not torch.cuda.is_available():
            raise GenerationError("the Triton backend needs a CUDA GPU; none is available here (use the eager "
                                  "or compiled backend)")
        if device.type != "cuda":
            raise GenerationError(f"the Triton backend needs the model on a CUDA GPU; it is on {device}")
    elif device.type != "cpu":
        raise GenerationError("the Triton backend in Triton's interpreter (TRITON_INTERPRET=1) runs on the CPU "
                              f"only; the model is on {device}")
    import kernels  # only now: TRITON_INTERPRET must be settled before the kernels are decorated

    if kernels.INTERPRET != _interpreting():
        raise GenerationError("TRITON_INTERPRET changed after the Triton kernels were imported; set it before "
                              "starting Fornax")
    kv, model.kv_caches = model.kv_caches, None   # caches are per runner: not copied, not shared
    try:
        return kernels.patch(model)
    finally:
        model.kv_caches = kv


class TritonRunner(EagerRunner):
    name = "triton"

    def __init__(self, model: Transformer):
        super().__init__(patched_model(model))


class CompiledTritonRunner(CompiledRunner):
    """CompiledRunner over the patched model. `compiler` other than "inductor" names a torch._dynamo backend
    (tests use "aot_eager": inductor cannot generate code around kernels that run in Triton's interpreter)."""
    name = "compiled+triton"

    def __init__(self, model: Transformer, progress: Callable[[float, str], None] | None = None,
                 compiler: str = "inductor"):
        self.compiler = compiler
        super().__init__(patched_model(model), progress)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs, cudagraphs: bool = False):
        if self.compiler == "inductor":
            return super()._backend(gm, example_inputs, cudagraphs)
        from torch._dynamo.backends.registry import lookup_backend

        self.compiles += 1
        return lookup_backend(self.compiler)(gm, example_inputs)
