"""The race's synthetic models (backend/bench/synthetic.py): the shapes are the real models', the file is laid out
as the default model's, and transformers' own GGUF reader gets the logits Fornax gets from it."""
import dataclasses
from collections import Counter

import pytest
import torch

import backend
from backend.bench.synthetic import scale_config, write_synthetic_gguf
from backend.loading import default_gguf_path
from backend.models.config import ModelConfig

gguf = pytest.importorskip("gguf")


def test_the_scale_presets_have_the_published_parameter_counts():
    # the safetensors totals of HuggingFaceTB/SmolLM2-360M and meta-llama/Llama-3.2-1B (tied embeddings)
    assert ModelConfig.from_name("smollm2-360m").n_params == 361_821_120
    assert ModelConfig.from_name("llama-3.2-1b").n_params == 1_235_814_400
    one_b = scale_config("1b")  # with SmolLM2's 49,152-token vocabulary in place of Llama 3's 128,256
    assert one_b.n_params == 1_235_814_400 - (128_256 - 49_152) * 2048
    assert (one_b.d_model, one_b.n_layer, one_b.d_ff, one_b.n_head, one_b.n_kv_head) == (2048, 16, 8192, 32, 8)
    with pytest.raises(backend.FornaxError, match="unknown scale"):
        scale_config("7b")


def tensor_types(path) -> Counter:
    reader = gguf.GGUFReader(path)
    return Counter((t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name, t.tensor_type.name)
                   for t in reader.tensors)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = dataclasses.replace(scale_config("360m"), n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2,
                              head_dim=16, name="synthetic-small")
    path = tmp_path_factory.mktemp("synthetic") / "synthetic-small.Q4_1.gguf"
    write_synthetic_gguf(cfg, path)
    return cfg, path


def test_the_file_is_laid_out_as_the_default_models(small):
    cfg, path = small
    ours, default = tensor_types(path), tensor_types(default_gguf_path())
    assert set(ours) == set(default)  # the same roles at the same types: Q4_1 matmuls, Q8_0 embedding, F32 norms
    assert all(n == cfg.n_layer for key, n in ours.items() if key[0] not in ("token_embd.weight",
                                                                           "output_norm.weight"))
    assert not list(path.parent.glob("*.tmp*"))  # written atomically: no temporary left


def test_transformers_reads_the_file_as_fornax_does(small):
    transformers = pytest.importorskip("transformers")
    cfg, path = small
    handle = backend.load(str(path), dtype="float32")
    assert (handle.config.d_model, handle.config.n_layer, handle.config.n_kv_head) == (64, 2, 2)
    ids = handle.tokenizer.encode("The capital of France is", add_special_tokens=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = theirs(torch.tensor([ids])).logits[0]
        got = handle.model(torch.tensor([ids]))[0]
    assert expected.abs().max() > 1  # random weights, but not a model that outputs zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
