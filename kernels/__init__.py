"""Triton kernels with autograd for the Transformer's hot ops. Imports torch and triton only.

Set TRITON_INTERPRET=1 before importing this package to run every kernel in Triton's CPU interpreter
(on CPU tensors); otherwise the kernels need a CUDA GPU.
"""
from .layer_norm import layer_norm
from .rms_norm import add_rms_norm, rms_norm
from .gelu import gelu_tanh
from .rotary import rotary
from .swiglu import swiglu
from .attention import attention
