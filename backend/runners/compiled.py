"""torch.compile of the model's cached forward: C++/OpenMP code from inductor on CPU, Triton code (and CUDA graphs
for the decode step) on CUDA.

Shapes are what make it compile once: the static KV cache is allocated in power-of-two lengths and kept, a decode
step is always (B, 1) at a tensor position, and a prompt is right-padded to a power-of-two bucket (its padding is
written to cache slots that decode overwrites before any query can see them). So a new prompt length reuses the
compiled decode step, and a new length in a known bucket the compiled prefill. Compiled code is cached on disk under
the Fornax cache (`inductor/`), so a restart recompiles much faster.
"""
from __future__ import annotations

import copy
import itertools
import os
import time
from typing import Callable

import torch

from ..disk.caches import cache_root
from ..models.transformer import Transformer
from .eager import EagerRunner

MIN_CACHE = 512      # smallest static cache: short chats share one shape
MIN_BUCKET = 16      # smallest prefill bucket


def pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def own_logits(out: torch.Tensor) -> torch.Tensor:
    """The last position's logits (B, V) in fp32, always a new tensor: a CUDA graph's output lives in its static
    memory, which the next replay overwrites (`.float()` alone is a view for an fp32 model)."""
    return out[:, -1].to(torch.float32, copy=True)


def weight_sharing_copy(model: Transformer) -> Transformer:
    """New module objects over the same parameters and buffers (so this runner's caches and compiled guards are
    its own while the weights are not copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    kv, model.kv_caches = model.kv_caches, None
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.kv_caches = kv
    return clone


def use_disk_cache() -> None:
    """Inductor's on-disk caches (FX graphs, compiled kernels) under the Fornax cache, unless the user set one."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


class CompiledRunner(EagerRunner):
    name = "compiled"

    def __init__(self, model: Transformer, progress: Callable[[float, str], None] | None = None):
        super().__init__(weight_sharing_copy(model))
        use_disk_cache()
        # Every runner compiles the same code object (`_forward`) for its own model copy, and dynamo counts those
        # entries together: a long-lived server that swaps models would hit the default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4096)
        self.say = progress or (lambda fraction, message: None)
        self.compiles = 0           # graphs inductor has compiled for this runner (a test counts recompiles)
        self.compile_s = 0.0        # wall time of the calls that compiled
        self._decode = torch.compile(self._forward, fullgraph=True, dynamic=False, backend=self._decode_backend)
        self._prefill = torch.compile(self._forward, fullgraph=True, dynamic=False, backend=self._backend)
        self._seen: set[tuple] = set()

    def _backend(self, gm: torch.fx.GraphModule, example_inputs, cudagraphs: bool = False):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        # (not inductor's frozen-weight C++ GEMM template: no faster than MKL here and slower to compile;
        # docs/benchmarks.md)
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": cudagraphs})

    def _decode_backend(self, gm: torch.fx.GraphModule, example_inputs):
        """The decode step as a CUDA graph on GPUs: one launch per token instead of hundreds."""
        return self._backend(gm, example_inputs, cudagraphs=self.device.type == "cuda")

    def _forward(self, ids: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.model(ids, input_pos, last)

    def memory_plan(self, max_len: int) -> dict:
        ctx = self.model.config.max_seq_len
        return dict(cache_len=min(ctx, pow2_at_least(max_len, MIN_CACHE)), kv_dtype=self.model.tok_emb.weight.dtype)

    def start(self, batch: int, max_len: int) -> None:
        self.model.setup_cache(batch, self.memory_plan(max_len)["cache_len"])

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        B, T = ids.shape
        # a fresh contiguous tensor: dynamo guards on strides, and a sliced (B, 1) view would recompile
        ids = torch.empty((B, T), dtype=torch.long, device=self.device).copy_(ids)
        last = torch.tensor([T - 1], device=self.device)
        if T == 1:
            fn, L = self._decode, 1
        else:  # right-pad to the bucket (never past the cache's end)
            fn, L = self._prefill, min(pow2_at_least(T, MIN_BUCKET), self.model.cache_len - pos)
            ids = torch.cat([ids, ids.new_zeros(B, L - T)], dim=1)
        input_pos = torch.arange(pos, pos + L, device=self.device)
        key = (B, L, self.model.cache_len)
        if key in self._seen:
            return own_logits(fn(ids, input_pos, last))
        self.say(0.0, f"compiling the model for {'decode' if T == 1 else f'prompts up to {L} tokens'} "
                      f"(once; later runs reuse it)")
        t = time.perf_counter()
        out = own_logits(fn(ids, input_pos, last))
        self.compile_s += time.perf_counter() - t
        self._seen.add(key)
        return out
