"""A public deployment's Hub allowlist pinned to a revision (FORNAX_HUB_ALLOWLIST=org/name@<sha or tag>): a visitor's
`org/name` loads the pinned revision (so a later push by the repo's owner is never what is fetched), the pinned
`org/name@<rev>` loads too, any other revision is refused with the allowlist message; an unpinned entry keeps its
old meaning. Offline: backend.formats.hub's snapshot is replaced by a recorder that hands back a tiny local model."""
import gradio as gr
import pytest

import backend.formats.hub as hub
from playground import deployment
from playground.state import current
from playground.tabs import model
from tests.backend.tiny import make_tiny

SHA = "0123456789abcdef0123456789abcdef01234567"
NO_PROGRESS = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def public(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_MODEL_SWAP", "anyone")
    return tmp_path


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    """(repo id, revision) of every hub snapshot asked for; each returns a tiny llama folder."""
    folder = tmp_path / "tiny-llama"
    make_tiny("llama", folder)
    calls = []

    def snapshot(repo_id, token=None, revision=None):
        calls.append((repo_id, revision))
        return folder

    monkeypatch.setattr(hub, "snapshot", snapshot)
    return calls


def refused(call) -> str:
    with pytest.raises(gr.Error) as e:
        call()
    return e.value.message


def test_an_unpinned_entry_loads_the_main_branch_and_no_revision(public, monkeypatch):
    monkeypatch.setenv("FORNAX_HUB_ALLOWLIST", "org/tiny")
    assert deployment.check_source("org/tiny") == "org/tiny"
    for other in (f"org/tiny@{SHA}", "org/tiny@main", "org/other"):
        message = refused(lambda: deployment.check_source(other))
        assert "loads only these models: default, org/tiny," in message


def test_a_pinned_entry_loads_its_revision_only(public, monkeypatch):
    monkeypatch.setenv("FORNAX_HUB_ALLOWLIST", f"org/tiny@{SHA}, org/tagged@v1.0")
    assert deployment.check_source("org/tiny") == f"org/tiny@{SHA}"       # the bare id: the pinned revision
    assert deployment.check_source(f"org/tiny@{SHA}") == f"org/tiny@{SHA}"
    assert deployment.check_source("org/tagged") == "org/tagged@v1.0"
    for other in ("org/tiny@main", "org/tiny@" + "f" * 40, "org/tagged@v2.0", "org/tagged@v1.0@x"):
        message = refused(lambda: deployment.check_source(other))
        assert f"default, org/tiny@{SHA}, org/tagged@v1.0" in message and "paths on the server" in message
    assert deployment.shown_source(f"org/tiny@{SHA}") == f"org/tiny@{SHA}"


def test_a_visitor_loading_a_pinned_id_fetches_the_pinned_revision(public, fetched, monkeypatch):
    monkeypatch.setenv("FORNAX_HUB_ALLOWLIST", f"org/tiny@{SHA}")
    model.load_model("org/tiny", progress=NO_PROGRESS, request=None)
    assert fetched == [("org/tiny", SHA)]
    assert current.handle.source == f"org/tiny@{SHA}" and current.loaded_by is None  # a Hub model: anyone's
    assert current.info()["shown_source"] == f"org/tiny@{SHA}"
    model.load_model(f"org/tiny@{SHA}", progress=NO_PROGRESS, request=None)
    assert fetched[-1] == ("org/tiny", SHA)
    message = refused(lambda: model.load_model("org/tiny@main", progress=NO_PROGRESS, request=None))
    assert "loads only these models" in message and len(fetched) == 2    # refused before any fetch


def test_private_mode_takes_a_revision_of_any_id(tmp_path, fetched, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    model.load_model("someone/model@v3", progress=NO_PROGRESS, request=None)
    assert fetched == [("someone/model", "v3")]
