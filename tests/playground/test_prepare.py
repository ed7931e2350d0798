"""Opening on the fastest faithful path (playground/prepare.py, `--prepare fast`) on a tiny model, with real
exports and their real parity reports: the Backend selector switches to the first of int4, int8 whose report's KL
is within the bound, a visitor who picked a backend keeps it, and with a bound below every export's KL the selector
stays on eager and the status line says why."""
import json

import gradio as gr
import pytest

from export.cache import export_folder
from export.fastest import FAITHFUL_KL, parity_kl
from playground import create_app, prepare
from playground.tabs import model, params
from tests.backend.tiny import make_tiny


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))  # nothing cached: the exports are made here
    make_tiny("llama", tmp_path / "llama")
    return str(tmp_path / "llama")


def follow() -> list[str]:
    """The status lines the preparation showed, once it is done."""
    assert prepare.wait(timeout=300), "the preparation did not finish in 300 s"
    assert prepare.status.lines[-1] == prepare.status.message
    return prepare.status.lines


def report_kl(source: str, quant: str) -> float:
    """Read straight from the export's parity.json (held-out KL where the report has it)."""
    report = json.loads((export_folder(source, quant) / "parity.json").read_text())
    return report["heldout"]["mean_kl"] if "heldout" in report else report["mean_kl"]


def test_the_selector_opens_on_a_faithful_export_and_not_on_an_unfaithful_one(tiny):
    create_app(tiny, prepare="fast")
    shown = follow()
    kls = {q: report_kl(tiny, q) for q in ("int4", "int8")}  # both were exported: int4 was tried first
    expected = next(f"onnx-{q}" for q in ("int4", "int8") if kls[q] <= FAITHFUL_KL)  # int8 here, int4 is too far
    assert any(line.startswith("preparing onnx-int4") for line in shown)
    assert prepare.status.backend == expected
    assert shown[-1].startswith(f"{expected} ready") and "tok/s" in shown[-1]
    # a page opened now starts on it; a page that was open switches on its next tick, unless its visitor chose
    assert model.refresh()[2].value == expected
    line, selector, timer = params.poll_preparation(False)
    assert line == shown[-1] and selector.value == expected and timer.active is False
    _, kept, _ = params.poll_preparation(True)
    assert "value" not in kept and expected in [name for _, name in kept["choices"]]
    # the OpenAI API answers on it too unless a request names another backend
    from fastapi.testclient import TestClient

    from playground.openai_api import server
    api = TestClient(server())
    body = {"prompt": "The", "max_tokens": 2, "temperature": 0}
    assert api.post("/v1/completions", json=body).json()["system_fingerprint"] == f"fornax-{expected}"
    named = api.post("/v1/completions", json={**body, "backend": "eager"}).json()
    assert named["system_fingerprint"] == "fornax-eager"

    # the same exports (now cached) against a bound below both their KLs: not faithful enough, stays on eager
    create_app(tiny, prepare="fast", prepare_max_kl=min(kls.values()) / 2)
    shown = follow()
    assert any(line.startswith("checking the cached onnx-int4") for line in shown)
    assert not any("exporting" in line for line in shown)  # cached exports are read, not made again
    assert prepare.status.backend is None
    assert shown[-1].startswith("staying on eager") and "onnx-int4" in shown[-1] and "onnx-int8" in shown[-1]
    assert model.refresh()[2].value == "eager"
    _, selector, timer = params.poll_preparation(False)
    assert selector == gr.skip()
    assert timer.active is False


def test_prepare_is_off_in_the_tests_and_the_flag_is_checked(monkeypatch):
    assert prepare.mode(None) == "none"  # tests/playground/conftest.py: the suite never exports in the background
    monkeypatch.delenv("FORNAX_PREPARE")
    assert prepare.mode(None) == "fast"  # what a user gets
    with pytest.raises(ValueError, match="fast or none"):
        prepare.mode("fastest")


def test_the_held_out_kl_decides_where_the_report_has_it():
    assert parity_kl({"mean_kl": 0.01, "heldout": {"mean_kl": 0.002}}) == 0.002
    assert parity_kl({"mean_kl": 0.01}) == 0.01
    assert parity_kl({"kind": "lstm", "top1_agreement": 1.0}) is None  # no KL: never taken as faithful
