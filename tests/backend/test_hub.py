"""Hub loads: the size is read before any weight is downloaded, and a public deployment never sends the server's
token; a pinned revision (`org/name@rev`) is the one sized and fetched. Offline: huggingface_hub's download
functions are replaced by recorders."""
import json

import pytest

import backend.formats.hub as hub
from backend.errors import ModelLoadError
from backend.limits import LimitError


class Calls(list):
    """(what, name, token) per call; `.revisions`: (what, repo, revision) per call."""


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    calls, revisions = Calls(), []
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4)))

    def download_file(repo_id, name, token, revision=None):
        calls.append(("file", name, token))
        revisions.append(("file", repo_id, revision))
        return config

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot", kw.get("local_files_only", False), kw.get("token")))
        revisions.append(("snapshot", repo_id, kw.get("revision")))
        if kw.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(hub, "_download_file", download_file)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls.revisions = revisions
    return calls


def test_public_mode_never_sends_the_server_token(fake_hub, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setattr(hub, "_safetensors_parameter_count", lambda repo, token, revision=None: {"F32": 200_000})
    hub.snapshot("org/small")
    assert [c[-1] for c in fake_hub] == [False, False, False]   # local lookup, config.json, download
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    assert hub.hub_token() is None and hub.hub_token("hf_x") == "hf_x"


def test_over_cap_weights_are_refused_before_the_download(fake_hub, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setattr(hub, "_safetensors_parameter_count", lambda repo, token, revision=None: {"BF16": 7_000_000_000})
    with pytest.raises(LimitError, match="parameter count"):
        hub.snapshot("org/big")
    assert ("snapshot", False, False) not in fake_hub                  # nothing but config.json was fetched


def test_repo_ids_that_are_paths_are_refused():
    for bad in ("a/..", "../x", "a/b/c", "a/.", "/etc"):
        with pytest.raises(ModelLoadError, match="Hub id"):
            hub.check_repo_id(bad)
    hub.check_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_pinned_revision_is_what_is_sized_and_fetched(fake_hub, monkeypatch):
    """`org/name@sha` (or revision=) reaches every huggingface_hub call: the cache lookup, config.json, the
    safetensors headers and the download; without one, None (the main branch) as before."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    counted = []
    monkeypatch.setattr(hub, "_safetensors_parameter_count",
                        lambda repo, token, revision=None: counted.append((repo, revision)) or {"F32": 200_000})
    hub.snapshot(f"org/small@{sha}")
    assert fake_hub.revisions == [("snapshot", "org/small", sha), ("file", "org/small", sha),
                                  ("snapshot", "org/small", sha)]
    assert counted == [("org/small", sha)]
    fake_hub.revisions.clear(), counted.clear()
    hub.snapshot("org/small", revision="v1.0")
    assert {r for _, _, r in fake_hub.revisions} == {"v1.0"} and counted == [("org/small", "v1.0")]
    fake_hub.revisions.clear()
    hub.snapshot("org/small")
    assert {r for _, _, r in fake_hub.revisions} == {None}
    with pytest.raises(ModelLoadError, match="two revisions"):
        hub.snapshot(f"org/small@{sha}", revision="v1.0")


def test_the_real_huggingface_hub_functions_get_the_revision(monkeypatch):
    """hub.py's own wrappers pass revision= on to huggingface_hub (replaced here: nothing touches the network)."""
    seen = []

    class Meta:
        parameter_count = {"F32": 10}

    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo, name, **kw: seen.append(("download", repo, name, kw["revision"])) or "/x")
    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata",
                        lambda repo, **kw: seen.append(("headers", repo, kw["revision"])) or Meta())
    hub._download_file("org/a", "config.json", False, revision="v2")
    assert hub._safetensors_parameter_count("org/a", False, revision="v2") == {"F32": 10}
    assert seen == [("download", "org/a", "config.json", "v2"), ("headers", "org/a", "v2")]


def test_load_reads_a_pinned_source(fake_hub, monkeypatch):
    """backend.load's resolve: `org/name@rev` is a Hub source (private mode: a local user's pin)."""
    from backend import loading

    got = []
    monkeypatch.setattr(hub, "snapshot", lambda repo, token=None, revision=None: got.append((repo, revision)))
    loading.resolve("org/name@v1.0")
    loading.resolve("org/name")
    assert got == [("org/name", "v1.0"), ("org/name", None)]
    for bad in ("org/name@", "org/name@../main", "org/name@a@b"):
        with pytest.raises(ModelLoadError):
            loading.resolve(bad)
