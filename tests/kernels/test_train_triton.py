"""`finetune --kernels triton`: the same losses as eager training, through the Triton kernels (the interpreter here)."""
import pytest

from backend import TrainError
from backend.training import train
from tests.backend.train_util import quick, write_text


def test_triton_training_loss_curve_equals_eager(tmp_path, device):
    """tiny-llama: fused RMSNorm, rotary, SwiGLU and attention backward, and the fused linear cross-entropy.
    Small batches: the interpreter costs ~10 ms per program. fp32 on the CPU (interpreter): equal to 1e-4; on a GPU
    both runs use bf16 autocast, which rounds in different places, so only to 3e-2 there."""
    data = write_text(tmp_path / "corpus.txt", 2000)
    kw = dict(mode="pretrain", preset="tiny-llama", vocab_size=300, steps=5, lr=3e-3, seq_len=16, batch_size=1,
              grad_accum=2, eval_every=0, sample_every=0, val_fraction=0.05, device=device)
    rel = 1e-4 if device == "cpu" else 3e-2
    eager = train(quick(data, tmp_path / "eager", **kw))
    triton = train(quick(data, tmp_path / "triton", kernels="triton", **kw))
    assert eager["status"] == triton["status"] == "done"
    ours = [loss for _, loss in triton["train_loss"]]
    ref = [loss for _, loss in eager["train_loss"]]
    assert len(ours) == len(ref) == 5
    assert ref[-1] < ref[0]                                           # the run trains: the comparison means something
    for a, b in zip(ours, ref):
        assert abs(a - b) <= rel * abs(b), (ours, ref)
    assert triton["val_loss"][-1][1] == pytest.approx(eager["val_loss"][-1][1], rel=rel)


def test_triton_training_refuses_unknown_kernels(tmp_path):
    with pytest.raises(TrainError, match="kernels must be one of"):
        quick(write_text(tmp_path / "c.txt", 2000), tmp_path / "o", kernels="cuda").check()
