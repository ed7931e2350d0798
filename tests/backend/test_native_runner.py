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


def synthetic_handle(tmp_path_factory, name: str, seed: int, **shape):
    """A handle on a small synthetic Llama-shaped GGUF (Q4_1 matmuls, Q8_0 embedding) of SmolLM2-360M's kind."""
    cfg = dataclasses.replace(scale_config("360m"), name=name, **shape)
    path = tmp_path_factory.mktemp(name) / f"{name}.Q4_1.gguf"
    write_synthetic_gguf(cfg, path, seed=seed)
    return load(str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    # head_dim 32 and odd layer widths: every matmul's inputs are whole blocks, the outputs are not multiples of 8
    return synthetic_handle(tmp_path_factory, "synthetic-native", 3, n_layer=3, d_model=96, d_ff=160, n_head=3,
                            n_kv_head=1, head_dim=32)


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


# --- what a hostile file or a second thread could do -----------------------------------------------------------
def test_fx_check_refuses_what_the_buffers_do_not_fit(handle):
    """fornax_cpu.c checks a description itself (fx_new refuses it): sizes that are not whole blocks, a matrix whose
    shape is not the model's, more blocks per row than its per-row scale buffer holds."""
    import ctypes

    runner = handle.runner("native")
    cos, sin = (np.ascontiguousarray(t[:16].numpy()) for t in handle.model.rope_tables(16))

    def desc(**changes):
        d = native.ModelDesc.from_buffer_copy(runner._desc)
        d.rope_cos, d.rope_sin, d.rope_len = cos.ctypes.data, sin.ctypes.data, 16
        for k, v in changes.items():
            setattr(d, k, v)
        return d

    lib = runner.lib
    assert lib.fx_check(ctypes.byref(desc())) == 0
    assert lib.fx_check(ctypes.byref(desc(dim=100))) == -1          # not whole blocks of 32
    assert lib.fx_check(ctypes.byref(desc(head_dim=31))) == -1       # odd: rotary halves
    assert lib.fx_check(ctypes.byref(desc(rope_cos=None))) == -2
    wide = desc()
    wide.lm_head = native.QMatrix.from_buffer_copy(runner._desc.lm_head)
    wide.lm_head.cols = 32 * 1025                                    # past MAX_BLOCKS
    assert lib.fx_check(ctypes.byref(wide)) == -9 and not lib.fx_new(ctypes.byref(wide))
    layers = (native.Layer * handle.config.n_layer)(*runner._layers)
    layers[2].down.rows += 8                                         # a layer's matrix not the model's shape
    assert lib.fx_check(ctypes.byref(desc(layers=ctypes.cast(layers, ctypes.POINTER(native.Layer))))) == -12


def test_a_restarted_model_with_a_longer_cache_gets_longer_softmax_rows(handle):
    import ctypes

    runner = handle.runner("native")
    ids = torch.randint(0, 49152, (1, 120), generator=torch.Generator().manual_seed(4))
    want = runner.full_logits(ids)[0, -1]
    c = runner._new(1, 8)
    try:
        emb = np.ascontiguousarray(handle.model.tok_emb.weight.detach()[ids[0]].numpy())
        out = np.empty((1, handle.config.vocab_size), np.float32)
        assert runner.lib.fx_forward(c, emb.ctypes.data, 4, 0, 0, out.ctypes.data, 2) == 0   # scratch: 4 rows, 8 keys
        cos, sin = (np.ascontiguousarray(t[:128].numpy().copy()) for t in handle.model.rope_tables(128))
        desc = ctypes.cast(c, ctypes.POINTER(native.ModelDesc))  # Model begins with its ModelDesc
        desc.contents.rope_cos, desc.contents.rope_sin, desc.contents.rope_len = cos.ctypes.data, sin.ctypes.data, 128
        assert runner.lib.fx_start(c, 1, 128) == 0
        for pos in range(0, 120, 4):  # 4 rows a call (no new scratch for rows), up to 120 keys a softmax row
            assert runner.lib.fx_forward(c, emb[pos:].ctypes.data, 4, pos, 0, out.ctypes.data, 2) == 0
        torch.testing.assert_close(torch.from_numpy(out[0]), want, atol=1e-4, rtol=1e-4)
    finally:
        runner._free(c)


def test_the_c_side_reads_its_own_copies_of_the_tables(handle):
    """The rotary tables and norms handed to C are copies: the model may rebuild or update its own (a longer
    cache grows the tables; training updates the norms) while a C model still reads them."""
    runner = handle.runner("native")
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(5))
    want = runner.full_logits(ids)[0, -1]
    model = handle.model
    runner.start(1, 16)
    saved = model.rope_cos.clone(), model.blocks[0].attn_norm.weight.detach().clone()
    try:
        with torch.no_grad():
            model.rope_cos.zero_()
            model.blocks[0].attn_norm.weight.zero_()
        got = runner.forward(ids, 0)[0]
    finally:
        with torch.no_grad():
            model.rope_cos.copy_(saved[0])
            model.blocks[0].attn_norm.weight.copy_(saved[1])
        runner.free()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_shapes_the_c_side_cannot_run_are_refused_before_reading(handle, monkeypatch):
    from backend.runners import native as native_runner

    read = []
    monkeypatch.setattr(native_runner, "quantized_linears", lambda *a: read.append(a) or {})
    odd = dataclasses.replace(handle.config, d_ff=100)
    with pytest.raises(GenerationError, match="FFN size to be a multiple of 32"):
        native_runner.check_shapes(odd)
    wide = dataclasses.replace(handle.config, d_ff=32 * 1025)
    with pytest.raises(GenerationError, match="up to 32768"):
        native_runner.check_shapes(wide)
    native_runner.check_shapes(handle.config)
    assert not read


def test_a_file_that_cannot_be_read_is_a_generation_error(handle, monkeypatch):
    from backend.runners import native as native_runner

    def truncated(path, cfg):
        raise ValueError("cannot reshape array of size 1000 into shape (96,newaxis,20)")

    monkeypatch.setattr(native_runner, "quantized_linears", truncated)
    with pytest.raises(GenerationError, match="could not read this GGUF file's blocks: ValueError"):
        native_runner.NativeRunner(handle.model, handle.gguf_path)


def test_preparing_is_counted_against_the_memory_budget(handle, monkeypatch):
    from backend import budget
    from backend.runners import native as native_runner

    parts = native_runner.preparation_parts(handle.config)
    assert parts["decoded blocks"] > budget.param_count(handle.config)  # codes alone are a byte a weight
    monkeypatch.setattr(budget, "memory_budget_bytes", lambda: sum(parts.values()) - 1)
    with pytest.raises(budget.MemoryBudgetError, match="preparing the native CPU path"):
        native_runner.NativeRunner(handle.model, handle.gguf_path)


def test_q4_0_scales_past_fp16_are_refused():
    from backend.formats.gguf_blocks import QuantizedLinear
    from backend.runners.native import packed

    q = np.zeros((1, 32), np.uint8)
    assert packed(QuantizedLinear(q, np.full((1, 1), 8000.0, np.float32), 8, 4, None))["bits"] == 4
    with pytest.raises(GenerationError, match="scales up to 8188"):
        packed(QuantizedLinear(q, np.full((1, 1), 9000.0, np.float32), 8, 4, None))


def test_a_runner_the_model_cannot_have_is_asked_for_once(handle, monkeypatch):
    from backend.handle import ModelHandle
    from backend.runners import PREPARABLE

    calls = []

    def refuses(model, progress, gguf=None):
        calls.append(1)
        raise GenerationError("the native CPU path reads Q4_0, Q4_1 and Q8_0 blocks only")

    other = ModelHandle(handle.model, handle.tokenizer, handle.source, gguf_path=handle.gguf_path)
    monkeypatch.setitem(PREPARABLE, "native", refuses)
    assert "native" in other.runner_names()
    for _ in range(2):
        with pytest.raises(GenerationError, match="Q8_0 blocks only"):
            other.runner("native")
    assert len(calls) == 1 and "native" not in other.runner_names()


def test_a_failed_build_names_no_server_path_in_public_mode(monkeypatch):
    from backend.runners import native as native_runner

    def fails(folder, flags=None):
        raise native.NativeUnavailable(f"building fornax_cpu.c with gcc failed: {folder}/x.c:1: error")

    monkeypatch.setattr(native, "load", fails)
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    with pytest.raises(GenerationError) as e:
        native_runner.library()
    assert "/" not in str(e.value) and "C build failed" in str(e.value)
    monkeypatch.delenv("FORNAX_PUBLIC")
    with pytest.raises(GenerationError, match="error"):
        native_runner.library()


def test_matching_checks_every_row_chunk(handle):
    from backend.formats import gguf_blocks as gb

    linears = gb.quantized_linears(handle.gguf_path, handle.config)
    name = "lm_head"
    w = handle.model.get_submodule(name).weight.detach().numpy().copy()
    assert gb.matching({name: linears[name]}, {name: w})
    w[-1, 0] += 0.5                       # the last chunk's last row
    assert not gb.matching({name: linears[name]}, {name: w})
