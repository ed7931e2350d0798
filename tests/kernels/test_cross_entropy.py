import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-3, 2e-2)]


def reference(logits, targets, ignore_index=-100):
    """Mean over non-ignored rows of logsumexp(x) - x[target], in fp32, written out."""
    x = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    picked = x.gather(1, t.clamp_min(0)[:, None])[:, 0]
    losses = (torch.logsumexp(x, dim=-1) - picked)[keep]
    return losses.sum() / keep.sum()


@pytest.mark.parametrize("shape", [(3, 7, 301), (5, 2500)])   # 2500: several column blocks per row
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_cross_entropy_forward_and_grad(shape, dtype, atol, rtol, device):
    torch.manual_seed(0)
    logits = (3 * torch.randn(shape, device=device)).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], device=device)
    targets.view(-1)[:2] = -100                                                   # ignored rows
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = kernels.cross_entropy(x1, targets)
    (2.5 * loss).backward()                                                       # a dloss other than 1
    ref = reference(x2, targets)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=atol, rtol=rtol)
    assert (x1.grad.reshape(-1, shape[-1])[:2] == 0).all()


def test_cross_entropy_custom_ignore_index_and_all_ignored(device):
    logits = torch.randn(4, 301, device=device)
    targets = torch.tensor([5, 7, 7, 300], device=device)
    torch.testing.assert_close(kernels.cross_entropy(logits, targets, ignore_index=7),
                               reference(logits, targets, ignore_index=7), atol=1e-5, rtol=1e-5)
    all_ignored = torch.full((4,), -100, device=device)
    assert torch.isnan(kernels.cross_entropy(logits, all_ignored))                # as F.cross_entropy: 0 / 0


def test_cross_entropy_rejects_mismatched_targets(device):
    with pytest.raises(ValueError, match="targets"):
        kernels.cross_entropy(torch.randn(4, 10, device=device), torch.zeros(5, dtype=torch.long, device=device))


@pytest.mark.gpu
def test_cross_entropy_large_vocab_bf16(device):
    logits = torch.randn(4096, 49152, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 49152, (4096,), device=device)
    loss = kernels.cross_entropy(logits, targets)
    loss.backward()
    torch.testing.assert_close(loss, reference(logits.detach(), targets), atol=2e-3, rtol=2e-3)
