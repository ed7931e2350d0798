"""The engine's time budget and the one memory budget, on tiny models: a deadline ends a run between steps keeping
its text; a request whose estimated memory (weights, KV cache, activations) passes the budget is refused before
anything is allocated, and the handle still generates afterwards."""

import pytest

import backend
from backend import budget
from tests.backend.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder)
    return backend.load(folder)


class _StepDeadline(budget.Deadline):
    """A deadline that expires after `steps` looks at it: deterministic, no sleeping."""

    def __init__(self, steps: int):
        super().__init__(3600, "this chat")
        self.looks = 0
        self.steps = steps

    @property
    def expired(self) -> bool:
        self.looks += 1
        return self.looks > self.steps


def test_a_deadline_ends_decoding_between_steps_keeping_the_text(tiny):
    deadline = _StepDeadline(3)
    result = tiny.generate("The", max_new_tokens=50, temperature=0, ignore_eos=True, deadline=deadline)
    completion = result.completions[0]
    assert completion.finish_reason == "time"
    assert 1 <= len(completion.token_ids) <= 5          # stopped after a few steps, not at 50
    assert completion.text                               # what was generated is kept


def test_a_tiny_real_deadline_stops_a_long_run(tiny):
    deadline = budget.Deadline(0.001, "this chat")
    result = tiny.generate("The", max_new_tokens=100, temperature=0, ignore_eos=True, deadline=deadline)
    assert result.completions[0].finish_reason == "time"
    assert len(result.completions[0].token_ids) < 100
    again = tiny.generate("The", max_new_tokens=3, temperature=0, ignore_eos=True)
    assert again.completions[0].finish_reason == "length" and len(again.completions[0].token_ids) == 3


def test_a_deadline_ends_a_long_prompt_between_prefill_chunks(tiny, monkeypatch):
    import backend.generation.generate as generate

    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    seen = []
    deadline = _StepDeadline(1)
    stream = tiny.stream(list(range(5, 105)), max_new_tokens=4, temperature=0, deadline=deadline,
                         prefill_progress=lambda done, total: seen.append(done))
    assert list(stream) == []
    assert seen == [16, 32]
    assert [c.finish_reason for c in stream.result.completions] == ["time"]


def test_a_deadline_passing_while_waiting_for_the_model_is_a_plain_error(tiny):
    tiny._lock.acquire()          # another generation holds the model
    try:
        with pytest.raises(budget.TimeBudgetError, match="waited for the model"):
            tiny.generate("The", max_new_tokens=2, deadline=budget.Deadline(0.05, "this chat"))
    finally:
        tiny._lock.release()
    assert tiny.generate("The", max_new_tokens=2, temperature=0).completions[0].token_ids


# --- the memory budget: generation (issue 18 item 2) ---

def _wide_kv_handle(folder, n_layer=16):
    """A small model (17 MB) whose KV cache is huge per token, like the issue's 76 MB GGUF: 32 KV heads of
    dimension 256 over a model width of 8 -> 1 MiB of cache per token per layer group of 2 (fp32)."""
    import torch

    from backend.models.config import ModelConfig
    from backend.handle import ModelHandle
    from backend.models.transformer import Transformer
    from backend.formats.tokenizer import Tokenizer
    from tests.backend.tiny import save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    cfg = ModelConfig(family="llama", vocab_size=vocab, n_layer=n_layer, n_head=32, n_kv_head=32, head_dim=256,
                      d_model=8, d_ff=16, max_seq_len=8192, eos_token_ids=[2])
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    model.requires_grad_(False)
    return ModelHandle(model.eval(), Tokenizer.from_folder(folder), str(folder))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return _wide_kv_handle(tmp_path_factory.mktemp("wide"))


def _peak_growth(fn):
    """(what fn raised or returned, peak RSS growth in bytes while it ran) — as the bad-input catalogue measures."""
    import gc

    from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset, rss_bytes

    gc.collect()
    if not peak_rss_reset():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    before = rss_bytes()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 -- returned for the test to assert on
        out = e
    return out, peak_rss_bytes() - before


@pytest.mark.parametrize("prompt_len, n, max_tokens", [(8, 4, 1024), (7000, 1, 1024)])
def test_a_generation_whose_kv_cache_passes_the_budget_is_refused_before_allocating(
        wide, monkeypatch, prompt_len, n, max_tokens):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    prompt = [5 + i % 300 for i in range(prompt_len)] if prompt_len > 8 else "Hello there"
    wide.model.free_cache()
    error, grew = _peak_growth(lambda: wide.stream(prompt, max_new_tokens=max_tokens, num_samples=n))
    assert isinstance(error, budget.MemoryBudgetError), error
    assert "KV cache" in str(error) and "GiB" in str(error) and "4.00 GiB" in str(error)
    assert wide.model.kv_caches is None                      # nothing allocated
    assert grew < 200 * 1024**2, f"peak RSS grew by {grew / 1e6:.0f} MB refusing it"
    small = wide.generate("Hello", max_new_tokens=2, temperature=0, ignore_eos=True)  # still generates
    assert len(small.completions[0].token_ids) == 2
    wide.model.free_cache()


def test_the_kv_estimate_is_what_the_runner_allocates(tiny):
    runner = tiny.runner()
    plan = runner.memory_plan(300)
    runner.start(3, 300)
    allocated = sum(c.k.nbytes + c.v.nbytes for c in tiny.model.kv_caches)
    assert budget.kv_cache_bytes(tiny.config, 3, plan["cache_len"], plan["kv_dtype"]) == allocated
    parts = budget.generation_parts(tiny.config, 3, 44, 256, tiny.dtype, **plan)
    assert parts["KV cache"] == allocated
    tiny.model.free_cache()


# --- GGUF: the dequantized size is checked before anything is dequantized (issue 18 item 5) ---

def _iq1s_gguf(path, rows: int, cols: int = 256):
    """A GGUF whose metadata is a small valid Llama but whose token embedding is declared rows × cols in IQ1_S
    (256 weights in 50 bytes, 1.56 bits each): a file of rows × cols × 50/256 bytes that dequantizes to 4 bytes a
    weight. The data is zeros (dequantizes to a valid block)."""
    import gguf
    import numpy as np

    from tests.backend.bad_files import byte_level_tokens

    tokens = byte_level_tokens() + ["<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, cols),
                       (w.add_head_count, 2), (w.add_head_count_kv, 2), (w.add_feed_forward_length, 16),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"), (w.add_token_list, tokens),
                       (w.add_eos_token_id, len(tokens) - 1)):
        add(value)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_tensor("token_embd.weight", np.zeros((rows, cols // 256 * 50), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ1_S)
    w.add_tensor("output_norm.weight", np.ones(cols, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_compact_gguf_that_dequantizes_past_the_budget_is_refused_before_dequantizing(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(256 * 1024**2))
    path = _iq1s_gguf(tmp_path / "bomb.gguf", rows=400_000)      # 19.5 MB file -> 410 MB of fp32 weights
    assert path.stat().st_size < 25e6
    error, grew = _peak_growth(lambda: backend.load(str(path)))
    assert isinstance(error, budget.MemoryBudgetError), error
    assert "bomb.gguf" in str(error) and "dequantized" in str(error) and "0.25 GiB" in str(error)
    assert grew < 200 * 1024**2, f"peak RSS grew by {grew / 1e6:.0f} MB refusing it"
    assert not any(p.startswith("gguf/") and p.count("/") > 1 for p in _files_under(tmp_path / "cache"))


def test_max_model_bytes_caps_a_gguf_by_its_dequantized_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_MAX_MODEL_BYTES", str(40 * 1024**2))
    path = _iq1s_gguf(tmp_path / "big.gguf", rows=50_000)        # 2.4 MB file -> 51 MB of fp32 weights
    with pytest.raises(backend.errors.FornaxError, match="dequantized to fp32"):
        backend.load(str(path))
    assert _files_under(tmp_path / "cache") in ([], ["gguf"])


# --- loading: the weights must fit, checked from the config and the files' sizes before a tensor is read ---

def _big_config_folder(folder, hidden=2048, layers=24):
    """A Llama folder whose config declares ~1.4 B parameters (5.6 GB fp32) over a weights file of a few bytes'
    worth of tensors: nothing may read it."""
    import json

    import torch
    from safetensors.torch import save_file

    from tests.backend.tiny import save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)))
    save_file({"model.embed_tokens.weight": torch.zeros(vocab, 8)}, str(folder / "model.safetensors"))
    return folder


def test_a_model_whose_weights_pass_the_budget_is_refused_before_reading_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(2 * 1024**3))
    folder = _big_config_folder(tmp_path / "big")
    error, grew = _peak_growth(lambda: backend.load(str(folder)))
    assert isinstance(error, budget.MemoryBudgetError), error
    assert "loading this model" in str(error) and "weights" in str(error) and "2.00 GiB" in str(error)
    assert str(tmp_path) not in str(error)                         # no server path in the message
    assert grew < 200 * 1024**2


def test_max_model_bytes_caps_a_folder_by_its_weight_files(tiny, monkeypatch):
    monkeypatch.setenv("FORNAX_MAX_MODEL_BYTES", "1000")
    with pytest.raises(backend.errors.FornaxError, match="weight files"):
        backend.load(tiny.source)
    monkeypatch.delenv("FORNAX_MAX_MODEL_BYTES")
    assert backend.load(tiny.source).generate("The", max_new_tokens=2).completions[0].token_ids


def test_the_load_estimate_covers_what_loading_adds(tiny):
    """The load's anonymous memory (weights in their dtype) is within the estimate; the files' pages are the page
    cache's, reclaimable, and not counted."""
    from backend.loading import read_hf_config

    built = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    parts = budget.load_parts(read_hf_config(tiny.source), "float32")
    assert built <= sum(parts.values()) <= 2 * built + 2 * 1024**2


# --- full forwards (fill-mask / PLL, scoring) go through ModelHandle.logits, which checks them ---

def test_a_forward_whose_logits_pass_the_budget_is_refused(tiny, monkeypatch):
    import torch

    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(64 * 1024**2))
    ids = torch.zeros(512, 128, dtype=torch.long)                # 512 × 128 × 384 fp32 logits = 100 MB
    error, grew = _peak_growth(lambda: tiny.logits(ids))
    assert isinstance(error, budget.MemoryBudgetError), error
    assert "this forward pass (512 × 128 tokens)" in str(error) and "logits" in str(error)
    assert grew < 50 * 1024**2
    assert tiny.logits(ids[:2, :8]).shape == (2, 8, tiny.config.vocab_size)


def test_check_forward_counts_training_activations_per_layer(tiny):
    inference = budget.forward_parts(tiny.config, 8, 256)
    training = budget.forward_parts(tiny.config, 8, 256, training=True)
    assert training["MLP"] == tiny.config.n_layer * inference["MLP"]
    with pytest.raises(budget.MemoryBudgetError, match="a finetune step"):
        budget.check_forward(tiny.config, 8, 256, what="a finetune step", training=True,
                             extra={"optimizer state": 10**15})


def test_a_training_job_past_the_memory_budget_is_refused_before_its_process_starts(tmp_path, monkeypatch):
    """A finetune is checked like a generation: weights, gradients, AdamW moments and one micro-batch's
    activations from the config, before the job's process (or its folder) exists."""
    from backend.training.config import TrainConfig
    from backend.training.jobs import JobManager

    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(64 * 1024**2))
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    jm = JobManager(tmp_path / "jobs")
    big = TrainConfig(data=str(data), mode="pretrain", preset="tiny-llama", batch_size=64, seq_len=512, steps=2)
    with pytest.raises(budget.MemoryBudgetError, match="one training step of this job .* would need about"):
        jm.start(big)
    assert list((tmp_path / "jobs").iterdir()) == [] and not (tmp_path / "finetuned").exists()
    small = TrainConfig(data=str(data), mode="pretrain", preset="tiny-llama", batch_size=2, seq_len=32, steps=2)
    from backend.training.jobs import check_job_memory

    check_job_memory(small)  # a step that fits passes
