import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)]


def reference(gate, up):
    """silu(gate) * up = gate * sigmoid(gate) * up, in fp32."""
    g = gate.float()
    return g * torch.sigmoid(g) * up.float()


@pytest.mark.parametrize("shape", [(3, 7, 123), (5, 1500)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_swiglu_forward_and_grads_on_halves_of_one_matmul(shape, dtype, atol, rtol, device):
    torch.manual_seed(0)
    gate_up = (2 * torch.randn(*shape[:-1], 2 * shape[-1], device=device)).to(dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    gu1 = gate_up.clone().requires_grad_()
    y = kernels.swiglu(*gu1.chunk(2, dim=-1))                                    # strided halves, no copy
    y.backward(dy)
    gu2 = gate_up.clone().requires_grad_()
    ref = reference(*gu2.chunk(2, dim=-1))
    ref.backward(dy.float())
    assert y.shape == shape and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gu1.grad.float(), gu2.grad.float(), atol=atol, rtol=rtol)


def test_swiglu_rejects_mismatched_shapes(device):
    with pytest.raises(ValueError, match="swiglu"):
        kernels.swiglu(torch.randn(2, 4, device=device), torch.randn(2, 5, device=device))
