"""What a reading of the GPU paths found, checked without a GPU (issue 20): Linear CE under bf16 autocast over fp32
weights, CUDA-graph logits that alias graph memory, fp32 GroupQueryAttention on the CUDA provider, launch grids
past 65,535 on axis 1, and DDP ranks that never pick their GPU."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.utils import GRID_AXIS12_MAX, attention_config, decode_config, folded_grid


def test_linear_cross_entropy_under_bf16_autocast_with_fp32_weights_equals_pytorch(device):
    """Full finetuning with `--kernels triton`: fp32 master weights, bf16 autocast. Raised 'mat1 and mat2 must
    have the same dtype' (an autocast bf16 matmul beside in-place fp32 accumulation); now it equals F.linear +
    cross_entropy under the same autocast, loss and both gradients, the gradients fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 32, device=device)
    weight = 0.3 * torch.randn(67, 32, device=device)
    targets = torch.randint(0, 67, (2, 5), device=device)
    targets[0, 0] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h1, w1, targets, chunk=4)
        ref = F.cross_entropy(F.linear(h2, w2).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    (2 * loss).backward()
    (2 * ref).backward()
    assert loss.dtype == torch.float32
    assert h1.grad.dtype == w1.grad.dtype == torch.float32
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_compiled_runner_hands_back_logits_that_outlive_the_next_graph_replay():
    """A CUDA graph's output is static memory the next replay overwrites; for an fp32 model `[:, -1].float()` was a
    view of it. A fake graph returning one static buffer stands in for the replay."""
    from backend import ModelConfig, Transformer
    from backend.runners.compiled import CompiledRunner

    model = Transformer(ModelConfig.from_name("tiny-llama")).eval()
    model.reset_buffers("cpu")
    runner = CompiledRunner(model)
    runner.start(1, 8)
    V = model.config.vocab_size
    static = torch.zeros(1, 1, V)                                    # the graph's output buffer

    def replay(ids, input_pos, last):
        static.fill_(float(input_pos[0]))                           # each replay writes the same memory
        return static

    runner._decode = replay
    runner._seen.add((1, 1, model.cache_len))
    first = runner.forward(torch.zeros(1, 1, dtype=torch.long), 3)
    second = runner.forward(torch.zeros(1, 1, dtype=torch.long), 4)
    assert first.dtype == torch.float32 and first.shape == (1, V)
    assert first.untyped_storage().data_ptr() != static.untyped_storage().data_ptr()
    assert (first == 3).all() and (second == 4).all()               # the first step's logits were not overwritten


def test_onnx_fp32_group_query_attention_stays_off_cuda_with_a_plain_reason(monkeypatch):
    """ONNX Runtime's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 GQA graph would fall back to the CPU node
    by node. The runner now says so and runs on the CPU provider; other graphs still get CUDA."""
    import onnxruntime as ort

    from backend.runners import onnx as onnx_runner

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen, reason = onnx_runner.choose_providers(both, True, "GroupQueryAttention", "float32")
    assert chosen == ["CPUExecutionProvider"]
    assert "GroupQueryAttention" in reason and "fp16" in reason and "CPU" in reason
    assert onnx_runner.choose_providers(both, True, "generic", "float32") == (both, None)
    assert onnx_runner.choose_providers(both, True, "GroupQueryAttention", "float16") == (both, None)
    assert onnx_runner.choose_providers(["CPUExecutionProvider"], True, "GroupQueryAttention") == (
        ["CPUExecutionProvider"], None)
    assert onnx_runner.choose_providers(both, False, "GroupQueryAttention") == (["CPUExecutionProvider"], None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: both)
    with pytest.warns(RuntimeWarning, match="fp16 export"):
        assert onnx_runner.providers("GroupQueryAttention") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("n_blocks, n_rows", [(1, 70_000), (70_000, 1), (3, 40_000)])
def test_launch_grids_fold_into_axis_0_past_65535(n_blocks, n_rows):
    """Rotary past 65,535 positions (one program per position on the GPU) and attention with batch x heads past
    65,535 had that count on grid axis 1, whose limit is 65,535: a launch error. Now one axis-0 grid."""
    grid = folded_grid(n_blocks, n_rows)
    assert grid == (n_blocks * n_rows,)
    assert all(axis <= GRID_AXIS12_MAX for axis in grid[1:])
    with pytest.raises(RuntimeError, match="more than one launch"):
        folded_grid(2**16, 2**16)


def test_folded_grids_give_the_same_attention_and_rotary(device):
    """The kernels split program_id(0) back into (row, block): several rows x several blocks, against PyTorch."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 16, device=device) for h in (4, 2, 2))
    cfg = attention_config(16, 4)
    assert 70 > cfg["BLOCK_M"]                                        # several query blocks per (batch, head)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(kernels.attention(q, k, v), ref, atol=1e-4, rtol=1e-4)
    cos, sin = torch.randn(70, 16, device=device), torch.randn(70, 16, device=device)
    qo, ko = kernels.rotary(q, k, cos, sin)

    def rot(x):
        return x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin

    torch.testing.assert_close(qo, rot(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, rot(k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("element_size, head_dim", [(4, 256), (4, 128), (2, 256)])
def test_decode_tiles_shrink_for_wide_fp32_heads(element_size, head_dim):
    """decode_config looks at the dtype and head dim: one K or V tile stays within DECODE_TILE_BYTES, which the
    AOT test (test_gpu_compile) shows keeps every build under 227 KB."""
    from kernels.utils import DECODE_TILE_BYTES

    cfg = decode_config(4096, 8, head_dim, element_size)
    assert cfg["BLOCK_N"] * head_dim * element_size <= DECODE_TILE_BYTES
    assert cfg["SPLIT_LEN"] % cfg["BLOCK_N"] == 0 and cfg["NUM_SPLITS"] * cfg["SPLIT_LEN"] >= 4096


def test_ddp_ranks_set_their_cuda_device_before_nccl(monkeypatch):
    """Under torchrun every rank must take its own GPU (torch.cuda.set_device(LOCAL_RANK)) before the process group
    starts; CPU stop flags and broadcast bytes need gloo beside nccl. Mocked: no GPU or second process here."""
    import torch.distributed as dist

    from backend.training.distributed import Dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    d = Dist.from_env("cuda")
    assert (d.world, d.rank, d.local_rank) == (2, 1, 1)
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl")]
    calls.clear()
    Dist.from_env("cpu")
    assert calls == [("init", "gloo")]
