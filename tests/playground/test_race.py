"""The Race tab's handler on a tiny model: two paths (eager and a real int4 ONNX export) race with the same greedy
settings; each column holds what that path generates on its own, the charts hold both, and the comparison marks the
first token where int4 leaves eager, checked against an independent comparison of the two token lists. Stop ends a
race; a second race of the same session is refused; public-mode caps apply."""
import re

import gradio as gr
import numpy as np
import pandas as pd
import pytest

from backend.bench.token_diff import divergence, first_divergence
from export.attach import attach_onnx
from playground import state
from playground.streaming import signal_stop
from playground.tabs import race
from tests.backend.tiny import make_tiny

PROMPT = "The quick brown fox"
TOKENS = 40
# the panel as the handler takes it after (prompt, paths, greedy): runner_name ... num_samples
PANEL = ["eager", TOKENS, 0.7, 0, 0.95, 0.0, 1.0, 0.0, 0.0, [], -1, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("race")
    mp.setenv("FORNAX_CACHE", str(root / "cache"))  # a real export, made here
    make_tiny("llama", root / "llama")
    state.current.load(str(root / "llama"))
    attach_onnx(state.current.handle, "int4")
    yield state.current.handle
    mp.undo()


def column(update) -> tuple[str, str, bool]:
    return update.value, update.label, update.visible


def test_two_paths_race_into_their_columns_with_both_in_the_charts(tiny):
    outs = list(race.race(PROMPT, ["onnx-int4", "eager"], True, *PANEL))
    final = outs[-1]
    cols, (decode, prefill, compare, summary) = final[:race.MAX_PATHS], final[race.MAX_PATHS:]
    # the model's order, eager first, whatever order the boxes were ticked in
    expected = {name: tiny.generate(PROMPT, backend=name, max_new_tokens=TOKENS, temperature=0)
                for name in ("eager", "onnx-int4")}
    for update, name in zip(cols, ["eager", "onnx-int4"]):
        text, label, visible = column(update)
        assert visible and text == expected[name].text
        assert label.startswith(race.label(name)) and "decode" in label and "tok/s" in label
    assert all(not column(u)[2] for u in cols[2:])  # the unused columns stay hidden
    for chart in (decode, prefill):
        frame = pd.DataFrame(chart.value["data"], columns=chart.value["columns"])
        assert list(frame["backend"]) == [race.label("eager"), race.label("onnx-int4")]
        assert (frame["tok/s"] > 0).all()
    assert "greedy" in summary and "stopped" not in summary
    # streamed: an earlier update showed eager's column part-way, before its final speed was known
    partial = [column(o[0]) for o in outs[:-1] if column(o[0])[0]]
    assert partial and all(expected["eager"].text.startswith(text) for text, _, _ in partial)
    assert any("decode" not in label for _, label, _ in partial)

    # the first divergence, against an independent comparison of the two greedy token lists
    a = np.array(expected["eager"].completions[0].token_ids)
    b = np.array(expected["onnx-int4"].completions[0].token_ids)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    index = int(differ[0]) if differ.size else (None if len(a) == len(b) else n)
    marked = re.search(r"data-diverges-at='(\d*)'", compare).group(1)
    assert marked == ("" if index is None else str(index))
    assert index is not None  # this tiny model's int4 export leaves eager early (its parity report: 7 / 64 greedy)
    d = divergence(tiny.tokenizer, a.tolist(), b.tolist())
    assert d.agreed + d.rest == tiny.tokenizer.decode(b.tolist(), skip_special_tokens=True)
    assert "<mark class='fx-race-diff'>" in compare


def test_first_divergence_edges():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2      # one ended early
    assert first_divergence([], [4]) == 0


def test_stop_ends_the_race_at_the_path_running(tiny):
    run = race.race(PROMPT, ["eager", "onnx-int4"], True, "eager", 100, *PANEL[2:])
    for out in run:
        if "generating" in out[-1]:  # the first path has started streaming
            break
    signal_stop(None)
    final = list(run)[-1]
    assert final[-1].startswith("**stopped**")
    text, label, _ = column(final[0])
    tokens = len(tiny.tokenizer.encode(text))
    assert tokens < 100 and "decode" in label  # eager ended early, with its timings
    assert "waiting" in column(final[1])[1]    # int4 never ran
    chart = final[race.MAX_PATHS].value
    assert [row[0] for row in chart["data"]] == [race.label("eager")]


def test_one_race_at_a_time_per_session(tiny):
    first = race.race(PROMPT, ["eager"], True, *PANEL)
    next(first)  # in flight
    try:
        with pytest.raises(gr.Error, match="already running"):
            list(race.race(PROMPT, ["eager"], True, *PANEL))
    finally:
        first.close()
    assert list(race.race(PROMPT, ["eager"], True, *PANEL))  # once it is over, the next one runs


def test_bad_input_and_public_caps_are_plain_errors(tiny, monkeypatch):
    with pytest.raises(gr.Error, match="no path 'triton-xl'"):
        list(race.race(PROMPT, ["eager", "triton-xl"], True, *PANEL))
    with pytest.raises(gr.Error, match="tick at least one path"):
        list(race.race(PROMPT, [], True, *PANEL))
    with pytest.raises(gr.Error, match="prompt is empty"):
        list(race.race("  ", ["eager"], True, *PANEL))
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_MAX_NEW_TOKENS", "16")
    with pytest.raises(gr.Error, match="max_new_tokens"):
        list(race.race(PROMPT, ["eager"], True, "eager", 17, *PANEL[2:]))


def test_a_public_race_never_compiles_or_exports_a_path(tiny, monkeypatch):
    """A path that is not prepared would be compiled (or exported) by its warm-up, under the model lock."""
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    assert "compiled" not in tiny.runners and "compiled" in tiny.runner_names()
    with pytest.raises(gr.Error, match="not prepared on this server: compiled"):
        list(race.race(PROMPT, ["eager", "compiled"], True, *PANEL))
    assert "compiled" not in tiny.runners
    assert list(race.race(PROMPT, ["eager", "onnx-int4"], True, *PANEL))  # prepared paths still race


def test_a_race_over_gradio_client(tiny):
    """/race as an API client calls it: each column's text and both charts come back (a chart is not mistaken for
    a file to download)."""
    from gradio_client import Client

    from playground import build_app
    from tests.playground.serve import serving

    with serving(build_app()) as url:
        out = Client(url, verbose=False).predict(prompt=PROMPT, paths=["eager", "onnx-int4"], greedy=True,
                                                 max_new_tokens=12, api_name="/race")
    for update, name in zip(out, ["eager", "onnx-int4"]):
        assert update["value"] == tiny.generate(PROMPT, backend=name, max_new_tokens=12, temperature=0).text
    for chart in out[race.MAX_PATHS:race.MAX_PATHS + 2]:
        assert [row[0] for row in chart["value"]["data"]] == [race.label("eager"), race.label("onnx-int4")]


def test_race_opens_with_the_prepared_fast_path_ticked_beside_eager(monkeypatch):
    """The start-up preparation finishes after the page is built: an untouched selection picks the prepared path
    up when the tab is opened, a visitor's own choice stands."""
    from playground import prepare

    info = {"source": "m", "prepared": ["eager", "onnx-int4"], "runners": ["eager", "onnx-int4", "compiled"]}
    monkeypatch.setattr(prepare, "status", prepare.Status(backend="onnx-int4", source="m"))
    monkeypatch.setattr(race.current, "info", lambda: info)
    assert race.default_paths(info) == ["eager", "onnx-int4"]
    assert race.refresh_paths(["eager"], touched=False)["value"] == ["eager", "onnx-int4"]
    assert race.refresh_paths(["eager"], touched=True)["value"] == ["eager"]
    assert race.refresh_paths([], touched=True)["value"] == ["eager", "onnx-int4"]  # nothing left: the defaults
