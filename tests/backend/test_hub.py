"""Hub loads: the size is read before any weight is downloaded, and a public deployment never sends the server's
token. Offline: huggingface_hub's download functions are replaced by recorders."""
import json

import pytest

import backend.hub as hub
from backend.errors import ModelLoadError
from backend.limits import LimitError


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    calls = []
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4)))

    def download_file(repo_id, name, token):
        calls.append(("file", name, token))
        return config

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot", kw.get("local_files_only", False), kw.get("token")))
        if kw.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(hub, "_download_file", download_file)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls


def test_public_mode_never_sends_the_server_token(fake_hub, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setattr(hub, "_safetensors_parameter_count", lambda repo, token: {"F32": 200_000})
    hub.snapshot("org/small")
    assert [c[-1] for c in fake_hub] == [False, False, False]   # local lookup, config.json, download
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    assert hub.hub_token() is None and hub.hub_token("hf_x") == "hf_x"


def test_over_cap_weights_are_refused_before_the_download(fake_hub, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setattr(hub, "_safetensors_parameter_count", lambda repo, token: {"BF16": 7_000_000_000})
    with pytest.raises(LimitError, match="parameter count"):
        hub.snapshot("org/big")
    assert ("snapshot", False, False) not in fake_hub                  # nothing but config.json was fetched


def test_repo_ids_that_are_paths_are_refused():
    for bad in ("a/..", "../x", "a/b/c", "a/.", "/etc"):
        with pytest.raises(ModelLoadError, match="Hub id"):
            hub.check_repo_id(bad)
    hub.check_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
