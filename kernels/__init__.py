"""Triton kernels with autograd for the Transformer's hot ops. Imports torch and triton only.

Set TRITON_INTERPRET=1 before importing this package to run every kernel in Triton's CPU interpreter (on CPU
tensors); otherwise the kernels need a CUDA GPU. Each op is a `torch.library` op (namespace `fornax`) inside a
`torch.autograd.Function`, so torch.compile traces through it and training backpropagates through it.
"""
import copy
from types import SimpleNamespace

import torch

from .attention import attention
from .cross_entropy import cross_entropy
from .decode_attention import decode_attention
from .gelu import gelu_tanh
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import add_rms_norm, rms_norm
from .rotary import rotary
from .swiglu import swiglu
from .utils import INTERPRET, check_device

# What a model module calls through its `ops` attribute: the same names and signatures as the eager functions.
OPS = SimpleNamespace(
    rms_norm=rms_norm, add_rms_norm=add_rms_norm, layer_norm=layer_norm, rotary=rotary, swiglu=swiglu,
    gelu_tanh=gelu_tanh, attention=attention, decode_attention=decode_attention, cross_entropy=cross_entropy,
    linear_cross_entropy=linear_cross_entropy)


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose modules call these kernels: every submodule with an `ops` attribute gets `OPS`.

    The copy shares the model's parameters and buffers (deepcopy with a memo that maps each one to itself), so
    it costs no weight memory and sees later weight updates; only the module objects are new."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    patched = copy.deepcopy(model, memo)
    n = 0
    for module in patched.modules():
        if hasattr(module, "ops"):
            module.ops = OPS
            n += 1
    if n == 0:
        raise ValueError(f"kernels.patch: no module of {type(model).__name__} has an `ops` attribute to swap")
    return patched


__all__ = ["OPS", "INTERPRET", "add_rms_norm", "attention", "check_device", "cross_entropy", "decode_attention",
           "gelu_tanh", "layer_norm", "linear_cross_entropy", "patch", "rms_norm", "rotary", "swiglu"]
