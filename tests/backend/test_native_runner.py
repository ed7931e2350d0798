"""The native CPU path (backend/runners/native.py over native/fornax_cpu.c) against Fornax eager on the same GGUF
file: a small synthetic Llama-shaped model with Q4_1 matmuls and a Q8_0 embedding written by gguf's own quantizer
(eager runs its dequantized weights in fp32, so the difference is the native path's int8 activations)."""
import dataclasses

import numpy as np
import pytest
import torch

import native
from backend import GenerationError
from backend.bench.synthetic import scale_config, write_synthetic_gguf
from backend.loading import load

pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    # head_dim 32 and odd layer widths: every matmul's inputs are whole blocks, the outputs are not multiples of 8
    cfg = dataclasses.replace(scale_config("360m"), n_layer=3, d_model=96, d_ff=160, n_head=3, n_kv_head=1,
                              head_dim=32, name="synthetic-native")
    path = tmp_path_factory.mktemp("native") / "synthetic-native.Q4_1.gguf"
    write_synthetic_gguf(cfg, path, seed=3)
    return load(str(path), dtype="float32", device="cpu")


def kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_the_handle_offers_and_prepares_it(handle):
    assert "native" in handle.runner_names()
    runner = handle.runner("native")
    assert runner.weight_bytes > 0 and handle.runner("native") is runner


def test_logits_follow_eager_fp32(handle):
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    want = handle.runner("eager").full_logits(ids)
    got = handle.runner("native").full_logits(ids)
    assert got.shape == want.shape
    assert kl(want, got).max() < 0.02
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    # the last layer takes float activations: all of them float is closer still
    from backend.runners.native import NativeRunner

    all_float = NativeRunner(handle.model, handle.gguf_path, float_layers=handle.config.n_layer).full_logits(ids)
    assert kl(want, all_float).mean() < kl(want, got).mean()


def test_decode_steps_match_the_whole_sequence_and_batches_match_singles(handle):
    runner = handle.runner("native")
    ids = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(1))
    whole = runner.full_logits(ids)                      # (3, 24, V), no cache of the runner's
    runner.start(3, 64)
    steps = [runner.forward(ids[:, :16], 0)] + [runner.forward(ids[:, t:t + 1], t) for t in range(16, 24)]
    torch.testing.assert_close(steps[0], whole[:, 15], atol=1e-4, rtol=1e-4)
    for k, t in enumerate(range(16, 24)):
        torch.testing.assert_close(steps[k + 1], whole[:, t], atol=1e-4, rtol=1e-4)
    runner.start(1, 64)                                  # a sequence alone gets what it got in the batch
    torch.testing.assert_close(runner.forward(ids[1:2], 0)[0], whole[1, -1], atol=1e-4, rtol=1e-4)
    runner.free()


def test_greedy_generation_runs_through_the_generation_loop(handle):
    prompt = handle.tokenizer.encode("The capital of France is")
    native_out = handle.generate(prompt, max_new_tokens=12, backend="native", temperature=0, ignore_eos=True)
    eager_out = handle.generate(prompt, max_new_tokens=12, backend="eager", temperature=0, ignore_eos=True)
    got, want = native_out.completions[0].token_ids, eager_out.completions[0].token_ids
    assert len(got) == 12
    assert got[:4] == want[:4]          # random weights: near-ties later may part the two ways


def test_positions_past_the_cache_are_refused(handle):
    runner = handle.runner("native")
    runner.start(1, 8)
    cache = runner.memory_plan(8)["cache_len"]
    with pytest.raises(GenerationError, match="refused positions"):
        runner.forward(torch.zeros(1, 1, dtype=torch.long), cache)
    runner.free()
    with pytest.raises(GenerationError, match="not started"):
        runner.forward(torch.zeros(1, 1, dtype=torch.long), 0)


def test_a_model_not_from_gguf_blocks_is_refused(handle, monkeypatch):
    from backend.runners import PREPARABLE, native as native_runner

    with pytest.raises(GenerationError, match="GGUF file"):
        PREPARABLE["native"](handle.model, None, gguf=None)
    # a file with a matmul in another type (F16, Q6_K, ...): its blocks are not read, and the error names it
    real = native_runner.quantized_linears
    monkeypatch.setattr(native_runner, "quantized_linears",
                        lambda path, cfg: {k: v for k, v in real(path, cfg).items() if k != "blocks.1.mlp.down"})
    with pytest.raises(GenerationError, match="blocks.1.mlp.down is not"):
        native_runner.NativeRunner(handle.model, handle.gguf_path)


def test_changed_weights_are_refused(handle):
    from backend.runners.native import NativeRunner

    model = handle.model
    w = model.blocks[0].mlp.down.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(1e-3)
        with pytest.raises(GenerationError, match="do not stand for the weights"):
            NativeRunner(model, handle.gguf_path)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_the_packing_keeps_gguf_order():
    codes = np.arange(64).reshape(1, 64) % 16
    p = native.pack_q4_1(codes, np.ones((1, 2), np.float16), np.zeros((1, 2), np.float16))
    block = p["codes"][0, :16]
    assert list(block & 0x0F) == list(codes[0, :16]) and list(block >> 4) == list(codes[0, 16:32])
