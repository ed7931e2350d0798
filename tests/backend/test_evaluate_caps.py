"""Evaluate's caps and time budget (issue 18, item 6): the size of an evaluation — rows, labels, characters,
forwards, token positions and the largest forward's memory — is computed and checked before anything is built or
run (a 400 KB CSV with many labels once built rows x labels sequences and ran for hours under the model lock), and
the scoring loops check a Deadline before every forward, so an evaluation stops on time with a plain error."""
from __future__ import annotations

import json
import random
import time

import gradio as gr
import pytest

import backend
from backend.budget import Deadline, MemoryBudgetError, TimeBudgetError
from backend.errors import FornaxError, ScoringError
from backend.data import labels as classify
from backend.scoring import perplexity as ppl
from backend.scoring.history import History
from backend.scoring.run import evaluate_model, read_data
from tests.backend import bad_files as bf
from tests.backend.tiny import make_tiny

MEMORY_BOUND = 200 * 1024**2
WORDS = "the a of cat dog ran sat on mat house red green blue quickly slowly film good bad plot".split()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    handle = backend.load(str(tiny_folder))
    yield handle
    handle.free()


def labelled_csv(path, rows: int, labels: int, chars: int):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(chars // 3))[:chars]
            f.write(f'"{text}",label{i % labels}\n')
    return path


class ExpiresAfter(Deadline):
    """A deadline that passes after `checks` checks: where the loops check it is then exactly observable."""

    def __init__(self, checks: int):
        super().__init__(60, "this evaluation")
        self.left = checks

    @property
    def expired(self) -> bool:
        self.left -= 1
        return self.left < 0


def counting(fn):
    def logits(ids):
        logits.calls += 1
        return fn(ids)
    logits.calls = 0
    return logits


def refused_quickly(call, fragment: str, tmp_path):
    """The call raises a FornaxError naming `fragment`, within 10 s, writing nothing under tmp_path, growing the
    peak RSS by less than MEMORY_BOUND."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    measured = bf.peak_rss_reset()
    start = bf.rss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(FornaxError) as err:
        call()
    seconds = time.perf_counter() - t0
    assert fragment in str(err.value), str(err.value)
    assert seconds < 10, seconds
    if measured:
        assert bf.peak_rss_bytes() - start < MEMORY_BOUND
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return err.value


def test_a_400kb_csv_with_many_labels_is_refused_before_any_forward(tiny, tmp_path, monkeypatch):
    """Public caps: 1,000 rows (while reading), 20 labels, 500,000 token positions (from the counts, before any
    row is built). The 990 x 20 case passes the row and label caps and ran ~2,500 forwards before."""
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    many_rows = labelled_csv(data_dir / "rows.csv", 4000, 50, 90)
    many_labels = labelled_csv(data_dir / "labels.csv", 200, 30, 400)
    much_work = labelled_csv(data_dir / "work.csv", 990, 20, 400)
    assert all(380_000 < p.stat().st_size < 420_000 for p in (many_rows, much_work))
    db = tmp_path / "scores.sqlite"
    forwards = counting(tiny.logits)
    monkeypatch.setattr(tiny, "logits", forwards)

    def evaluate(path):
        return lambda: evaluate_model(tiny, ["accuracy"], path, history=History(db))
    refused_quickly(evaluate(many_rows), "has more than 1,000 rows", tmp_path)
    refused_quickly(evaluate(many_labels), "the number of labels is 30 but this public deployment allows at "
                                           "most 20", tmp_path)
    err = refused_quickly(evaluate(much_work), "the token positions this classification would run through the "
                                              "model is", tmp_path)
    assert isinstance(err, ScoringError) and "nothing was run" in str(err)
    assert forwards.calls == 0


def test_perplexity_and_generation_work_is_capped(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    text = tmp_path / "long.jsonl"
    rng = random.Random(1)
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n"
                            for _ in range(300)))
    data = read_data(["perplexity"], text)
    with pytest.raises(ScoringError, match="the forwards this evaluation would run is .* at most 20,000"):
        evaluate_model(tiny, ["perplexity"], data, max_length=64, stride=1, history=False)
    with pytest.raises(ScoringError, match="exceeds the model's context"):
        evaluate_model(tiny, ["perplexity"], data, max_length=4096, history=False)
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "a"}) + "\n" for i in range(400)))
    with pytest.raises(ScoringError, match="the forwards this evaluation's generations would run is 25,600"):
        evaluate_model(tiny, ["chrf"], read_data(["chrf"], prompts), sampling={"max_new_tokens": 64},
                       history=False)


def test_the_memory_of_the_largest_forward_is_checked_first(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_MEMORY_BUDGET_BYTES", str(64 * 1024))
    path = labelled_csv(tmp_path / "small.csv", 8, 2, 200)
    forwards = counting(tiny.logits)
    monkeypatch.setattr(tiny, "logits", forwards)
    with pytest.raises(MemoryBudgetError, match="this classification.* would need about"):
        evaluate_model(tiny, ["accuracy"], path, history=False)
    with pytest.raises(MemoryBudgetError, match="this evaluation.* would need about"):
        evaluate_model(tiny, ["perplexity"], _prose(tmp_path),
                       history=False)
    assert forwards.calls == 0


def _prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(" ".join(WORDS * 20))
    return path


def test_a_passed_deadline_stops_the_scoring_loops_between_forwards(tiny):
    ids = [tiny.tokenizer.encode(" ".join(WORDS * 10))]
    assert ppl.count_windows(ids, 32, 16) > 3
    forwards = counting(tiny.logits)
    with pytest.raises(TimeBudgetError, match="this evaluation ran past"):
        ppl.perplexity(forwards, ids, 32, 16, deadline=ExpiresAfter(1))
    assert forwards.calls == 1
    forwards.calls = 0
    texts = [" ".join(WORDS[i:i + 5]) for i in range(12)]
    with pytest.raises(TimeBudgetError):
        classify.label_scores(forwards, tiny.tokenizer, texts, ["good", "bad"], 64, deadline=ExpiresAfter(2))
    assert forwards.calls == 2


@pytest.mark.parametrize("metrics, name", [(["perplexity"], "prose.txt"), (["accuracy"], "labels.csv"),
                                           (["perplexity", "agreement"], "prose.txt")])
def test_an_evaluation_past_its_deadline_records_nothing(tiny, tmp_path, metrics, name):
    path = _prose(tmp_path) if name == "prose.txt" else labelled_csv(tmp_path / name, 30, 2, 60)
    db = History(tmp_path / "scores.sqlite")
    with pytest.raises(TimeBudgetError, match="this evaluation ran past this deployment's time limit"):
        evaluate_model(tiny, metrics, path, max_length=32, stride=16, history=db, deadline=ExpiresAfter(2),
                       against="eager" if "agreement" in metrics else None,
                       backend="eager" if "agreement" not in metrics else None)
    assert db.rows(limit=10) == []
    result = evaluate_model(tiny, metrics[:1], path, max_length=32, stride=16, history=db)
    assert len(db.rows(limit=10)) == 1 and result["values"]


def test_the_tab_shows_the_refusal_and_the_time_limit_and_still_works(tiny_folder, tmp_path, monkeypatch):
    from playground import state
    from playground.errors import user_errors
    from playground.tabs.evaluate import run_evaluation

    monkeypatch.setenv("FORNAX_SCORES_DB", str(tmp_path / "scores.sqlite"))
    state.current.load(str(tiny_folder))
    handler = user_errors(run_evaluation)
    args = ("", "", 64, 32, 16, 0.0)
    quiet = dict(progress=lambda *a, **k: None)
    upload = labelled_csv(tmp_path / "big.csv", 4000, 50, 90)
    monkeypatch.setenv("FORNAX_MAX_EVAL_ROWS", "100")
    with pytest.raises(gr.Error, match="has more than 100 rows"):
        handler(str(upload), "", ["accuracy"], *args, **quiet)
    monkeypatch.setenv("FORNAX_EVENT_TIME_LIMIT_S", "0.000001")
    with pytest.raises(gr.Error, match="this evaluation ran past this deployment's time limit"):
        handler(None, "prose (perplexity, agreement)", ["perplexity"], *args, **quiet)
    monkeypatch.delenv("FORNAX_EVENT_TIME_LIMIT_S")
    summary, _, table, _ = handler(None, "prose (perplexity, agreement)", ["perplexity"], *args, **quiet)
    assert "**perplexity**" in summary and list(table["metric"]) == ["perplexity"]
