import pytest
import torch

import kernels


def reference(hidden, weight, targets, ignore_index=-100):
    """The unfused way: all (N, V) logits, then mean cross-entropy over non-ignored rows, in fp32."""
    logits = hidden.float() @ weight.float().t()                                  # (..., V)
    x = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    losses = (torch.logsumexp(x, dim=-1) - x.gather(1, t.clamp_min(0)[:, None])[:, 0])[keep]
    return losses.sum() / keep.sum()


@pytest.mark.parametrize("chunk", [5, None, 64])                                  # uneven, default, one chunk
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 5e-4), (torch.bfloat16, 2e-2, 2e-2)])
def test_linear_cross_entropy_forward_and_grads(chunk, dtype, atol, rtol, device):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 32, device=device).to(dtype)
    weight = (0.3 * torch.randn(301, 32, device=device)).to(dtype)
    targets = torch.randint(0, 301, (3, 7), device=device)
    targets[0, :3] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = kernels.linear_cross_entropy(h1, w1, targets, chunk=chunk)
    (1.5 * loss).backward()
    ref = reference(h2, w2, targets)
    (1.5 * ref).backward()
    torch.testing.assert_close(loss, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=atol, rtol=rtol)
    assert (h1.grad[0, :3] == 0).all()


def test_linear_cross_entropy_frozen_weight(device):
    """A frozen head (LoRA): only the hidden states get a gradient, and no weight gradient is computed."""
    hidden = torch.randn(2, 9, 16, device=device, requires_grad=True)
    weight = torch.randn(301, 16, device=device)
    targets = torch.randint(0, 301, (2, 9), device=device)
    kernels.linear_cross_entropy(hidden, weight, targets, chunk=4).backward()
    h2 = hidden.detach().clone().requires_grad_()
    reference(h2, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, atol=1e-5, rtol=5e-4)
    assert weight.grad is None


@pytest.mark.gpu
def test_linear_cross_entropy_peak_memory_at_49k_vocab(device):
    """The fused loss needs far less memory than materialising (N, V) logits and their gradient."""
    N, d, V = 8192, 576, 49152
    hidden = torch.randn(N, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)

    def peak(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda: torch.nn.functional.cross_entropy(hidden @ weight.t(), targets))
    fused = peak(lambda: kernels.linear_cross_entropy(hidden, weight, targets))
    assert fused * 4 <= eager, (fused, eager)
