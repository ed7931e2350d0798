"""The Fill-mask tab's handlers on a tiny random BERT (built by transformers in the test): two masks' bars carry
handle.fill_mask's candidates and probabilities, the heat line carries pseudo_log_likelihood's values; the tabs
follow the model (encoder -> Fill-mask, causal Transformer -> Chat + Completion, LSTM -> Completion); bad input is
a plain error and the app keeps serving (the OpenAI API too). And the Finetune tab's overlay of the last runs' losses
and its side-by-side table of a causal and an encoder classification run."""
from __future__ import annotations

import html
import json
import re
import time

import gradio as gr
import pytest
import torch

from backend.models.config import ModelConfig
from backend.generation.fill_mask import MASK_TOKEN
from backend.loading import save_pretrained
from backend.models.lstm import LSTMLM
from backend.formats.tokenizer import Tokenizer
from playground import render
from playground.errors import user_errors
from playground.state import current
from playground.tabs import chat, completion, fill_mask, race
from tests.backend.test_encoder import _config, _perturb, _tokenizer
from tests.backend.tiny import make_tiny, save_tokenizer
from tests.playground.serve import PANEL

TWO_MASKS = f"The capital of France is {MASK_TOKEN}, a {MASK_TOKEN} city."
SENTENCE = "A list comprehension builds a new list."


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import BertForMaskedLM

    root = tmp_path_factory.mktemp("fill-mask")
    tok = _tokenizer(root / "bert")
    torch.manual_seed(0)
    _perturb(BertForMaskedLM(_config(len(tok)))).save_pretrained(root / "bert")
    make_tiny("llama", root / "llama")
    (root / "lstm").mkdir()
    save_tokenizer(root / "lstm")
    tokenizer = Tokenizer.from_folder(root / "lstm")
    lstm = LSTMLM(ModelConfig(family="lstm", vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, max_seq_len=128))
    lstm.init_weights()
    save_pretrained(lstm, tokenizer, root / "lstm")
    return {name: str(root / name) for name in ("bert", "llama", "lstm")}


def test_two_masks_fill_with_the_backends_candidates_and_probabilities(folders):
    current.load(folders["bert"])
    page = fill_mask.fill(TWO_MASKS, 4)
    expected = current.handle.fill_mask(TWO_MASKS, top_k=4)
    charts = re.split(r"<div class='fx-mask' data-mask='\d+'>", page)[1:]
    assert len(charts) == 2 == len(expected)
    for chart, want in zip(charts, expected):
        got = [(html.unescape(t), float(p)) for t, p in re.findall(r"data-token='([^']*)' data-prob='([^']*)'", chart)]
        assert got == [(c["token"], c["prob"]) for c in want]  # exactly: the page carries repr(float)
        widths = [float(w) for w in re.findall(r"width:([\d.]+)%", chart)]  # each bar as long as its probability
        assert widths == [round(max(0.5, 100 * c["prob"]), 1) for c in want]
    # the text with the best candidates filled in
    best = html.unescape(re.sub(r"<[^>]+>", "", re.search(r"<div class='fx-mask-best'>(.*?)</div>", page).group(1)))
    assert best == TWO_MASKS.replace(MASK_TOKEN, "{}").format(*(m[0]["token"] for m in expected))


def test_the_heat_line_carries_each_tokens_pseudo_log_likelihood(folders):
    current.load(folders["bert"])
    page = fill_mask.pseudo_log_likelihood(SENTENCE)
    expected = current.handle.pseudo_log_likelihood(SENTENCE)
    values = [float(v) for v in re.findall(r"data-logprob='([^']*)'", page)]
    assert values == [t["logprob"] for t in expected["tokens"]]
    assert float(re.search(r"data-pll='([^']*)'", page).group(1)) == expected["pll"]
    titles = re.findall(r"title='([^']*)'", page)
    assert [float(re.search(r"log p = (-?[\d.]+)", t).group(1)) for t in titles] == \
        [round(t["logprob"], 3) for t in expected["tokens"]]
    # the line is the user's own text, each scored token one span, coloured by its value
    text = re.sub(r"<[^>]+>", "", re.search(r"<div class='fx-text'>(.*?)</div>", page).group(1))
    assert html.unescape(text) == SENTENCE
    colours = set(re.findall(r"class='fx-pll-tok'[^>]*style='background:([^']*)'", page))
    assert len(colours) >= 2


def tab_flags():
    """(chat, completion, race, fill-mask) shown, and the Insert button's token, after a load."""
    tabs = fill_mask.switch_tabs()
    assert fill_mask.SWITCHED == ("chat", "completion", "race", "fill_mask")
    return [t.constructor_args["visible"] is True for t in tabs[:4]], tabs[4]  # (else "hidden": see tab_visible)


def test_the_tabs_follow_the_model(folders):
    current.load(folders["bert"])
    assert tab_flags() == ([False, False, False, True], MASK_TOKEN)
    current.load(folders["llama"])
    assert tab_flags() == ([True, True, True, False], "")
    current.load(folders["lstm"])
    assert tab_flags()[0] == [False, True, True, False]  # no chat template: Completion and Race
    card = render.model_card(current.info())
    assert "does not chat" in card and "Heads" not in card  # (an LSTM has no attention heads)


def test_the_app_builds_with_the_tabs_of_the_loaded_model(folders):
    from playground.ui import build_app

    for name, visible in (("bert", {"Chat": False, "Completion": False, "Race": False, "Fill-mask": True}),
                          ("llama", {"Chat": True, "Completion": True, "Race": True, "Fill-mask": False})):
        current.load(folders[name])
        config = build_app().get_config_file()
        tabs = {c["props"].get("label"): c["props"].get("visible") is True for c in config["components"]
                if c.get("type") == "tabitem"}
        assert {k: tabs[k] for k in visible} == visible, tabs


def expect_plain(call, words):
    with pytest.raises(gr.Error) as e:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert words in e.value.message and "Traceback" not in e.value.message


def test_bad_inputs_are_plain_errors_and_the_app_keeps_serving(folders, monkeypatch):
    current.load(folders["bert"])
    expect_plain(lambda: fill_mask.fill("No mask in this text.", 5), f"the text has no {MASK_TOKEN}")
    expect_plain(lambda: fill_mask.fill("   ", 5), "the text is empty")
    expect_plain(lambda: fill_mask.fill(TWO_MASKS, 2.5), "top-k must be a whole number")
    expect_plain(lambda: fill_mask.pseudo_log_likelihood(["a list"]), "the text must be a string")
    # an encoder asked to complete or chat (the API, or a tab left open from before the load)
    expect_plain(lambda: completion.complete("The", **PANEL), "it does not generate text")
    expect_plain(lambda: race.race("The", ["eager"], True, **PANEL), "it does not generate text")
    expect_plain(lambda: chat.chat("Hi", [], "", **PANEL), "a BERT-style encoder model has no chat template; use Fill-mask")
    # public caps, before anything is tokenized
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    expect_plain(lambda: fill_mask.fill(TWO_MASKS, 50), "top-k is 50")
    expect_plain(lambda: fill_mask.pseudo_log_likelihood("word " * 300), "the text's length in characters is 1,500")
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    assert fill_mask.fill(TWO_MASKS, 3).count("class='fx-cand'") == 6  # still serving: 2 masks x 3
    # an LSTM asked for a chat template (Chat, Continue), and fill-mask on a model that predicts the next token
    current.load(folders["lstm"])
    expect_plain(lambda: chat.chat("Hi", [], "", **PANEL), "no chat template")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expect_plain(lambda: chat.continue_reply(history, "", **PANEL), "no chat template")
    expect_plain(lambda: fill_mask.fill(TWO_MASKS, 5), "fill-mask needs an encoder")
    text, _, stats = list(completion.complete("The", **{**PANEL, "max_new_tokens": 3}))[-1]
    assert "tok/s" in stats  # the LSTM still completes


# --- the Finetune plot: the last runs overlaid ---
def write_job(root, job_id, started, preset, losses, out=None, mode="pretrain", status="done"):
    job = root / job_id
    job.mkdir(parents=True)
    state = dict(id=job_id, status=status, step=len(losses), total_steps=len(losses), started=started,
                 updated=started + 1, out_dir=out or str(root / f"out-{job_id}"), samples=[], metrics={},
                 config=dict(mode=mode, preset=preset, model="default", task="text"),
                 train_loss=[[s + 1, v] for s, v in enumerate(losses)],
                 val_loss=[[len(losses), losses[-1] + 0.1, 2.0]] if losses else [])
    (job / "state.json").write_text(json.dumps(state))
    return state


def test_the_loss_plot_overlays_the_last_three_runs(tmp_path, monkeypatch):
    from playground.tabs import finetune

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path))
    root = finetune.manager().root
    now = time.time()
    runs = [write_job(root, f"job{i}", now + i, preset, [5.0 - i, 4.0 - i])
            for i, preset in enumerate(["tiny-gpt2", "tiny-llama", "tiny-lstm", "tiny-bert"])]
    # a job continued by a resume: the resumed one (same folder) carries its losses; it is shown once
    resumed = write_job(root, "job4", now + 4, "tiny-bert", [1.0, 0.9, 0.8], out=runs[3]["out_dir"])
    newest_first = [resumed, runs[2], runs[1]]
    assert [r["id"] for r in finetune.recent_runs(None)] == [r["id"] for r in newest_first]
    _, frame, *_ = finetune.poll()
    assert sorted(set(frame["split"])) == sorted(render.RUNS_COLOR_MAP)  # every slot named, always
    for (slot, _, _), state in zip(render.RUN_SLOTS, newest_first):  # every point of each run, in its slot
        train = frame[frame.split == f"{slot} · train"]
        assert list(zip(train.step, train.loss)) == [tuple(p) for p in state["train_loss"]]
        val = frame[frame.split == f"{slot} · validation"]
        assert list(zip(val.step, val.loss)) == [tuple(p[:2]) for p in state["val_loss"]]
    legend = finetune.runs_legend()
    assert re.findall(r"data-slot='(\w+)' data-job='(\w+)'", legend) == [("latest", "job4"), ("previous", "job2"),
                                                                         ("earlier", "job1")]
    assert "tiny-lstm · pretrain" in legend and "tiny-gpt2" not in legend  # the oldest of four is left out
    # a job just started keeps the newest slot before its first loss; an older job without losses is skipped
    write_job(root, "job4f", now + 4.5, "tiny-llama", [], status="failed")
    write_job(root, "job5", now + 5, "tiny-lstm", [], status="running")
    assert [r["id"] for r in finetune.recent_runs(None)] == ["job5", "job4", "job2"]
    assert frame_slot_is_empty(finetune.poll()[1], "latest")


def frame_slot_is_empty(frame, slot):
    return frame[frame.split.str.startswith(slot)]["loss"].isna().all()


def test_the_openai_api_refuses_an_encoder_and_an_lstm_chat_plainly(folders):
    from fastapi.testclient import TestClient

    from playground.openai_api import server

    chat_body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with TestClient(server()) as client:
        current.load(folders["bert"])
        for path, body, words in (("/v1/chat/completions", chat_body, "does not chat"),
                                  ("/v1/completions", {"prompt": "The", "max_tokens": 3}, "does not generate text")):
            r = client.post(path, json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        current.load(folders["lstm"])
        r = client.post("/v1/chat/completions", json=chat_body)
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text
        assert client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3}).status_code == 200


def test_compare_puts_a_causal_and_an_encoder_classification_run_side_by_side(folders, tmp_path, monkeypatch):
    from backend.training import train
    from backend.training.compare import classify_comparison
    from playground.tabs import finetune
    from tests.backend.test_encoder_train import _cfg
    from tests.backend.train_util import labelled_rows, make_base, write_jsonl

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    root = finetune.manager().root
    data = write_jsonl(tmp_path / "moods.jsonl", labelled_rows(80, seed=1))
    with pytest.raises(gr.Error, match="first finish a classification run"):
        user_errors(finetune.compare_classifiers)()
    runs = {}
    for i, (name, model) in enumerate((("causal", make_base(tmp_path / "causal-base")), ("encoder", folders["bert"]))):
        state = train(_cfg(model, data, tmp_path / name, "full", steps=4, seq_len=32))
        runs[name] = {**state, "id": f"job{i}", "status": "done", "started": time.time() + i}
        (root / f"job{i}").mkdir(parents=True)
        (root / f"job{i}" / "state.json").write_text(json.dumps(runs[name]))
        if name == "causal":  # one kind alone: nothing to compare with yet
            with pytest.raises(gr.Error, match="with an encoder"):
                user_errors(finetune.compare_classifiers)()
    page = finetune.compare_classifiers()
    table = classify_comparison(runs["causal"], runs["encoder"])
    rows = [line for line in page.splitlines() if line.startswith("| ") and "accuracy" not in line]
    assert len(rows) == 2 and table["same_validation"] and "same held-out rows" in page
    for i, (line, row) in enumerate(zip(rows, table["runs"])):
        assert line.startswith(f"| {'**' if i == table['best'] else ''}{row['kind']} ({row['method']})")
        assert f"{100 * row['accuracy']:.1f} %" in line and f"{row['macro_f1']:.3f}" in line
        assert f"| {row['n']} |" in line
