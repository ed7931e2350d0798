"""Export's memory (issue 18 item 12): its peak (~5x the fp32 weights beside the loaded model) is estimated from the
config and refused before a weight is read when it passes the budget; concurrent requests for one cached export
make it once."""
import json
import threading

import pytest
import torch

from backend import budget
from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset, rss_bytes
from tests.backend.tiny import make_tiny, save_tokenizer


def _declared_600m(folder):
    """A Llama folder whose config declares ~600 M parameters (the public export cap) over a token-sized weights
    file: an export must refuse it from the config alone."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vocab = save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=vocab, hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)))
    save_file({"model.embed_tokens.weight": torch.zeros(vocab, 8)}, str(folder / "model.safetensors"))
    return folder


def test_an_export_past_the_budget_is_refused_before_reading_a_weight(tmp_path, monkeypatch):
    from export.onnx_export import export

    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    folder = _declared_600m(tmp_path / "m")
    out = tmp_path / "out"
    peak_rss_reset()
    before = rss_bytes()
    with pytest.raises(budget.MemoryBudgetError, match=r"exporting this model .* would need about .* GiB"):
        export(str(folder), out, quant="int8", verify=False)
    assert peak_rss_bytes() - before < 200 * 1024**2
    assert not out.exists() or not any(out.iterdir())          # nothing written


def test_the_estimate_covers_a_real_export(tmp_path):
    """The measured factor bounds a tiny model's export (the exporter's own code warmed up by a first one)."""
    from backend.loading import read_hf_config
    from export.onnx_export import export

    make_tiny("llama", tmp_path / "m")
    export(str(tmp_path / "m"), tmp_path / "warm", verify=False)
    peak_rss_reset()
    before = rss_bytes()
    export(str(tmp_path / "m"), tmp_path / "out", verify=False)
    grew = peak_rss_bytes() - before
    assert grew <= sum(budget.export_parts(read_hf_config(tmp_path / "m")).values())


def test_concurrent_requests_for_one_cached_export_make_it_once(tmp_path, monkeypatch):
    import export.cache as cache

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    make_tiny("llama", tmp_path / "m")
    calls, entered = [], threading.Event()
    real = cache.export

    def counting(source, out, **kw):
        calls.append(out)
        entered.set()
        return real(source, out, **kw)

    monkeypatch.setattr(cache, "export", counting)
    results, errors = [], []

    def request():
        try:
            results.append(cache.cached_export(str(tmp_path / "m")))
        except Exception as e:  # noqa: BLE001 -- asserted below
            errors.append(e)

    first = threading.Thread(target=request)
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=request)         # arrives while the first is exporting
    second.start()
    first.join(120)
    second.join(120)
    assert errors == [] and len(calls) == 1 and len(set(results)) == 1 and len(results) == 2
