import math

import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)]


def reference(x):
    """GPT-2's gelu: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in fp32."""
    x = x.float()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


@pytest.mark.parametrize("shape", [(3, 7, 123), (5, 1500)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_gelu_tanh_forward_and_grad(shape, dtype, atol, rtol, device):
    torch.manual_seed(0)
    x = (4 * torch.randn(shape, device=device)).to(dtype)     # reaches the tails where tanh saturates
    x.view(-1)[:3] = torch.tensor([-60.0, 60.0, 0.0], dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = kernels.gelu_tanh(x1)
    y.backward(dy)
    ref = reference(x2)
    ref.backward(dy.float())
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=atol, rtol=rtol)
