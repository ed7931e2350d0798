"""The Kernel lab tab through gradio_client: the error table of one op (checked in Triton's interpreter in a
subprocess, as the app does without a GPU), refusals of bad and over-cap shapes, and the benchmark charts
from a committed CSV (or a plain note without one)."""
import gradio as gr
import pandas as pd
import pytest

from playground.tabs import kernel_lab
from tests.playground.serve import serving

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with gr.Blocks() as demo:
        kernel_lab.build()
    demo.queue()
    with serving(demo) as url:
        yield gradio_client.Client(url, verbose=False)


def test_the_error_table_of_rms_norm(client):
    summary, table, speed = client.predict(op="rms_norm", shape="2, 8, 128", dtype="float32",
                                           api_name="/kernel_check")
    assert "rms_norm" in summary and "interpreter" in summary and "agrees" in summary
    assert table["headers"] == kernel_lab.TABLE_HEADERS
    rows = {r[0]: r[1:] for r in table["data"]}
    assert list(rows) == ["forward", "grad x", "grad weight"]
    for error, ref_max, relative, ok in rows.values():
        assert float(error) <= 1e-5 * float(ref_max) and float(ref_max) > 0.1 and ok == "yes"


@pytest.mark.parametrize("shape, message", [
    ("2; rm -rf /", "type a shape as sizes separated by commas"),
    ("1, 2, 3, 4, 5, 6", "1 to 5 sizes"),
    ("", "type a shape"),
])
def test_bad_shapes_are_refused_in_plain_words(client, shape, message):
    with pytest.raises(AppError, match=message):
        client.predict(op="rms_norm", shape=shape, dtype="float32", api_name="/kernel_check")


def test_public_mode_caps_the_interpreter_tightly(client, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    with pytest.raises(AppError, match="needs 270,336 input elements; the cap here is 40,000"):
        client.predict(op="layer_norm", shape="64, 4096", dtype="float32", api_name="/kernel_check")
    with pytest.raises(AppError, match="each from 1 to 40,000"):
        client.predict(op="layer_norm", shape="4, 100000", dtype="float32", api_name="/kernel_check")
    with pytest.raises(AppError, match="key/value heads must divide"):
        client.predict(op="attention", shape="1, 4, 3, 8, 16", dtype="float32", api_name="/kernel_check")


def test_without_a_committed_benchmark_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_lab, "BENCH_CSV", tmp_path / "kernels-bench.csv")
    note, lines, bars = kernel_lab.bench_frames("rms_norm")
    assert "No GPU benchmark has been committed yet" in note and lines is None and bars is None


def test_a_committed_benchmark_becomes_charts(monkeypatch, tmp_path):
    csv = tmp_path / "kernels-bench.csv"
    rows = [("rms_norm", p, mode, metric, x, v * 0.9, v, v * 1.1, "H100", "2.11", "3.6")
            for x in (1024, 4096) for p, base in (("eager", 2.0), ("compile", 1.0), ("triton", 0.5))
            for mode, metric, v in (("full", "ms", base * x / 1024), ("forward", "ms", 9.0), ("full", "MB", 7.0))]
    pd.DataFrame(rows, columns=["op", "provider", "mode", "metric", "x", "p20", "p50", "p80", "device", "torch",
                                "triton"]).to_csv(csv, index=False)
    monkeypatch.setattr(kernel_lab, "BENCH_CSV", csv)
    note, lines, bars = kernel_lab.bench_frames("rms_norm")
    assert "H100" in note and "forward + backward" in note and "4096" in note
    assert len(lines) == 6 and set(lines["provider"]) == {"eager", "compile", "triton"}
    assert lines[(lines.x == 4096) & (lines.provider == "triton")]["ms"].item() == pytest.approx(2.0)
    assert dict(zip(bars["provider"], bars["speed-up over eager"])) == pytest.approx(
        {"eager": 1.0, "compile": 2.0, "triton": 4.0})
    assert "no rows for attention" in kernel_lab.bench_frames("attention")[0]
