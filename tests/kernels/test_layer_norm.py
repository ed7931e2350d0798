import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 5e-2, 2e-2)]


def reference(x, weight, bias, eps):
    """LayerNorm written out in fp32."""
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    y = (x32 - mean) * torch.rsqrt(var + eps) * weight.float()
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("shape", [(3, 7, 123), (37, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_forward_and_grads(shape, with_bias, dtype, atol, rtol, device):
    torch.manual_seed(0)
    x = (2 + 3 * torch.randn(shape, device=device)).to(dtype)  # an offset mean, as activations have
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    b = torch.randn(shape[-1], device=device).to(dtype) if with_bias else None
    dy = torch.randn(shape, device=device, dtype=dtype)
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    refs = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = kernels.layer_norm(*ours, 1e-5)
    y.backward(dy)
    ref = reference(*refs, 1e-5)
    ref.backward(dy.float())
    rows = x.numel() // shape[-1]
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours[0].grad.float(), refs[0].grad.float(), atol=atol, rtol=rtol)
    for o, r in zip(ours[1:], refs[1:]):
        if o is not None:
            torch.testing.assert_close(o.grad.float(), r.grad.float(), atol=atol * rows, rtol=rtol)


@pytest.mark.gpu
def test_layer_norm_large_bf16(device):
    x = torch.randn(8, 1024, 4096, device=device, dtype=torch.bfloat16)
    w, b = (torch.randn(4096, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5).float(), reference(x, w, b, 1e-5), atol=5e-2,
                               rtol=2e-2)
