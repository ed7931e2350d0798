import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 5e-2, 2e-2)]


def reference(x, weight, eps):
    """HF Llama's RMSNorm in fp32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("shape", [(3, 7, 123), (2, 5, 64), (37, 16)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rms_norm_forward_and_grads(shape, dtype, atol, rtol, device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    x1, w1 = leaves(x, w)
    y = kernels.rms_norm(x1, w1, 1e-6)
    y.backward(dy)
    x2, w2 = leaves(x, w)
    ref = reference(x2, w2, 1e-6)
    ref.backward(dy.float())
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=atol * shape[0], rtol=rtol)


def test_rms_norm_strided_rows(device):
    """Rows with a stride wider than the row (a slice of a larger tensor) are read in place."""
    big = torch.randn(3, 7, 200, device=device)
    x = big[..., :123]
    w = torch.randn(123, device=device)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), reference(x, w, 1e-5), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_rms_norm_forward_and_grads(dtype, atol, rtol, device):
    torch.manual_seed(1)
    shape = (3, 7, 123)
    x, r = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    dy, ds = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    x1, r1, w1 = leaves(x, r, w)
    y, s = kernels.add_rms_norm(x1, r1, w1, 1e-6)
    ((y.float() * dy.float()).sum() + (s.float() * ds.float()).sum()).backward()
    x2, r2, w2 = leaves(x, r, w)
    s_ref = x2.float() + r2.float()
    y_ref = reference(s_ref, w2, 1e-6)
    ((y_ref * dy.float()).sum() + (s_ref * ds.float()).sum()).backward()
    torch.testing.assert_close(s.float(), s_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol)
    for ours, ref in ((x1, x2), (r1, r2)):
        torch.testing.assert_close(ours.grad.float(), ref.grad.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=atol * 7, rtol=rtol)


def test_add_rms_norm_rejects_mismatched_residual(device):
    with pytest.raises(ValueError, match="residual shape"):
        kernels.add_rms_norm(torch.randn(2, 8, device=device), torch.randn(3, 8, device=device),
                             torch.ones(8, device=device))


@pytest.mark.gpu
def test_rms_norm_large_bf16(device):
    x = torch.randn(8, 1024, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = kernels.rms_norm(x, w, 1e-6)
    y.sum().backward()
    torch.testing.assert_close(y.float(), reference(x.detach(), w.detach(), 1e-6), atol=5e-2, rtol=2e-2)
