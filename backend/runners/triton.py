"""The model with our Triton kernels swapped in (`kernels/`): the eager runner over `kernels.patch(model)`.

Every module that runs an op through `self.ops` (norms, rotary, attention, decode attention, SwiGLU / GELU) calls
the Triton kernel instead; matmuls stay cuBLAS. The patched copy shares the model's weights. Needs a CUDA GPU, or
Triton's interpreter (TRITON_INTERPRET=1 set before `kernels` is imported; CPU tensors; tests only: it is slow).
"""
from __future__ import annotations

import os

import torch

from ..errors import GenerationError
from ..model import Transformer
from .eager import EagerRunner


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonRunner(EagerRunner):
    name = "triton"

    def __init__(self, model: Transformer):
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
            patched = kernels.patch(model)
        finally:
            model.kv_caches = kv
        super().__init__(patched)
