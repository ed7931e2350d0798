"""The Export tab offers each family its precisions (an LSTM or an encoder: fp32 and int8; a causal LM also int4),
refuses the others plainly, and shows an LSTM export's own parity checks."""
import gradio as gr
import pytest
import torch

from backend.models.config import ModelConfig
from backend.loading import save_pretrained
from backend.models.lstm import LSTMLM
from backend.formats.tokenizer import Tokenizer
from playground import state
from playground.errors import user_errors
from playground.tabs.export import export_model, fit_precisions
from tests.backend.tiny import make_tiny, save_tokenizer


def _values(radio: gr.Radio) -> list[str]:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in radio.choices]


def test_lstm_gets_fp32_and_int8_and_its_own_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "lstm").mkdir()
    save_tokenizer(tmp_path / "lstm")
    tokenizer = Tokenizer.from_folder(tmp_path / "lstm")
    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(family="lstm", vocab_size=tokenizer.vocab_size, n_layer=1, d_model=24,
                               max_seq_len=256))
    model.init_weights()
    save_pretrained(model, tokenizer, tmp_path / "lstm")
    state.current.load(str(tmp_path / "lstm"))
    radio = fit_precisions("int4")
    assert _values(radio) == ["fp32", "int8"] and radio.value == "int8"
    assert fit_precisions("fp32").value == "fp32"
    with pytest.raises(gr.Error, match="int4 is not offered for an LSTM model; pick fp32, int8"):
        user_errors(export_model)("int4", progress=lambda *a, **k: None)
    report, archive, backends, _ = export_model("fp32", progress=lambda *a, **k: None)
    assert "state carried step by step" in report and "greedy tokens identical | 64 / 64" in report
    assert archive.endswith(".zip") and "onnx-fp32" in state.current.handle.runners

    make_tiny("llama", tmp_path / "llama")
    state.current.load(str(tmp_path / "llama"))
    assert _values(fit_precisions("fp32")) == ["fp32", "int8", "int4"]
