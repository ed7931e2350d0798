"""`python -m backend evaluate`, generation and classification evaluation, the history, and bad input (a clear
error, nothing recorded)."""
import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

import backend
from backend.__main__ import main
from backend.errors import ScoringError
from backend.scoring.history import History, model_fingerprint
from backend.scoring.perplexity import perplexity
from backend.scoring.run import evaluate_model
from tests.backend.tiny import corpus_text, make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", folder)
    return folder, backend.load(folder)


def test_cli_perplexity_json_last_line_and_history_survives_restart(tiny, tmp_path):
    folder, handle = tiny
    text = corpus_text()[:1200]
    (tmp_path / "notes.txt").write_text(text)
    db = tmp_path / "history.sqlite"
    out = subprocess.run([sys.executable, "-m", "backend", "evaluate", "--model", str(folder), "--metric",
                          "perplexity", "--data", str(tmp_path / "notes.txt"), "--max-length", "64", "--stride", "32",
                          "--json", "--history", str(db)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = perplexity(handle.logits, [handle.tokenizer.encode(text)], 64, 32)
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert result["tokens"] == expected["tokens"]
    assert "scoring" in out.stderr  # the progress bar
    # a new process wrote it; a new connection here reads it back
    rows = History(db).rows()
    assert len(rows) == 1
    row = rows[0]
    assert (row.metric, row.model, row.backend, row.data) == ("perplexity", str(folder), "eager", "notes.txt")
    assert row.value == pytest.approx(expected["perplexity"], rel=1e-9)
    assert row.model_fingerprint == model_fingerprint(handle)
    assert row.settings["max_length"] == 64 and row.settings["stride"] == 32
    import hashlib

    assert row.data_fingerprint == hashlib.sha256((tmp_path / "notes.txt").read_bytes()).hexdigest()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_generation_evaluation_scores_the_model_s_own_answers(tiny, tmp_path):
    import sacrebleu

    _, handle = tiny
    rows = [{"prompt": "The quick brown", "reference": "fox jumps over the lazy dog"},
            {"messages": [{"role": "user", "content": "Say hello"}], "reference": ["hello", "hi there"]},
            {"prompt": "Python is", "reference": "a programming language"}]
    rows[0]["reference"], rows[2]["reference"] = [rows[0]["reference"], "a fox"], [rows[2]["reference"], "nice"]
    data = tmp_path / "gen.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    history = History(tmp_path / "h.sqlite")
    sampling = {"max_new_tokens": 6, "temperature": 0.0}
    result = evaluate_model(handle, ["bleu", "chrf", "rouge", "exact_match"], data, sampling=sampling,
                            history=history)
    predictions = [handle.generate(r.get("prompt") or r["messages"], **sampling).text for r in rows]
    assert [e["prediction"] for e in result["examples"]] == predictions
    refs = [list(s) for s in zip(*[r["reference"] for r in rows])]
    assert result["values"]["bleu"] == sacrebleu.corpus_bleu(predictions, refs).score
    assert result["values"]["chrf"] == sacrebleu.corpus_chrf(predictions, refs).score
    assert result["examples"][1]["prompt"] == "Say hello"
    assert all("chrf" in e and "rougeL" in e and "exact_match" in e for e in result["examples"])
    recorded = {r.metric: r.value for r in history.rows()}
    assert recorded == result["values"] and set(recorded) >= {"bleu", "chrf", "rouge1", "rougeL", "exact_match"}
    assert len({r.run_id for r in history.rows()}) == 1


def test_classification_evaluation_equals_a_direct_computation(tiny, tmp_path):
    _, handle = tiny
    rows = [("great film, loved it", "positive"), ("terrible and boring", "negative"), ("what a delight", "positive"),
            ("awful acting", "negative"), ("fine I guess", "neutral")]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "\n".join(f'"{t}",{label}' for t, label in rows))
    result = evaluate_model(handle, ["accuracy", "f1"], data, history=False)
    labels = sorted({label for _, label in rows})
    eos = handle.tokenizer.token_to_id("<|im_end|>")

    def loglik(text, label):  # one unpadded sequence at a time
        prompt = handle.tokenizer.encode(f"{text}\nLabel:")
        answer = handle.tokenizer.encode(" " + label, add_special_tokens=False) + [eos]
        ids = torch.tensor([prompt + answer])
        logp = handle.logits(ids)[0, :-1].log_softmax(-1)
        return logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item()

    predicted = [max(labels, key=lambda lab: loglik(t, lab)) for t, _ in rows]
    assert [e["prediction"] for e in result["examples"]] == predicted
    hits = [p == g for p, (_, g) in zip(predicted, rows)]
    assert result["values"]["accuracy"] == pytest.approx(sum(hits) / len(rows))
    report = result["report"]
    assert report["labels"] == labels and sum(map(sum, report["confusion"])) == len(rows)
    assert sum(report["confusion"][i][i] for i in range(len(labels))) == sum(hits)


def test_history_appends_in_one_transaction_and_refuses_non_numbers(tmp_path):
    h = History(tmp_path / "h.sqlite")
    common = dict(model="m", model_fingerprint="f", backend="eager", data="d", data_fingerprint="x",
                  settings={"a": 1})
    run = h.append(values={"bleu": 10.0, "chrf": 20.0}, **common)
    with pytest.raises(ScoringError):
        h.append(values={"bleu": 1.0, "chrf": float("nan")}, **common)
    with pytest.raises(ScoringError):
        h.append(values={}, **common)
    again = History(tmp_path / "h.sqlite").rows()
    assert [(r.metric, r.value, r.run_id) for r in again] in ([("chrf", 20.0, run), ("bleu", 10.0, run)],
                                                              [("bleu", 10.0, run), ("chrf", 20.0, run)])
    assert History(tmp_path / "h.sqlite").rows(metric="bleu")[0].settings == {"a": 1}


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("case,metric,data,extra,message", [
    ("empty", "perplexity", b"  \n", [], "empty"),
    ("binary", "perplexity", b"abc\x00def", [], "binary"),
    ("latin-1", "perplexity", "caf\xe9 au lait".encode("latin-1"), [], "not UTF-8"),
    ("one token", "perplexity", '{"text": "The quick brown fox"}\n{"text": "a"}\n', [], "line 2 is 1 token"),
    ("stride", "perplexity", "some text here", ["--max-length", "16", "--stride", "32"], "stride 32 > max_length"),
    ("unknown", "perplexion", "some text", [], "unknown metric 'perplexion'"),
    ("mixed", "perplexity,bleu", "some text", [], "different data"),
    ("no reference", "bleu", '{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n', [], "line 2 has no 'reference'"),
    ("reference counts", "bleu", '{"prompt": "a", "reference": "b"}\n{"prompt": "c", "reference": ["d", "e"]}\n',
     [], "same number of references"),
    ("one label", "accuracy", "text,label\nhello,a\nworld,a\n", [], "only the label"),
    ("no second backend", "agreement", "some text here, long enough", [], "agreement compares two backends"),
])
def test_bad_input_is_a_clear_error_and_records_nothing(tiny, tmp_path, capsys, case, metric, data, extra, message):
    folder, _ = tiny
    suffix = {"bleu": ".jsonl", "accuracy": ".csv"}.get(metric, ".jsonl" if data[:1] in ("{", b"{") else ".txt")
    path = _write(tmp_path / f"data{suffix}", data)
    db = tmp_path / "history.sqlite"
    code = main(["evaluate", "--model", str(folder), "--metric", metric, "--data", str(path), "--history", str(db),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert History(db).rows() == []


def test_perplexity_history_compares_a_model_before_and_after_a_change(tiny, tmp_path):
    """Two models, same data: two rows with different fingerprints and the data's one fingerprint."""
    folder, handle = tiny
    data = _write(tmp_path / "t.txt", corpus_text()[:600])
    h = History(tmp_path / "h.sqlite")
    first = evaluate_model(handle, ["perplexity"], data, max_length=64, history=h)
    other = backend.load(folder)
    with torch.no_grad():
        other.model.tok_emb.weight.mul_(1.5)
    second = evaluate_model(other, ["perplexity"], data, max_length=64, history=h)
    rows = h.rows(metric="perplexity")
    assert [r.value for r in rows] == [second["values"]["perplexity"], first["values"]["perplexity"]]
    assert rows[0].model_fingerprint != rows[1].model_fingerprint
    assert rows[0].data_fingerprint == rows[1].data_fingerprint
    assert not math.isclose(rows[0].value, rows[1].value)
    backend.save_pretrained(handle.model, handle.tokenizer, tmp_path / "copy")  # same weights, another folder
    assert model_fingerprint(backend.load(tmp_path / "copy")) == rows[1].model_fingerprint


def test_a_finetune_records_its_validation_scores_for_the_saved_model(tmp_path, monkeypatch):
    from backend.training import train
    from tests.backend.train_util import make_base, quick, write_text

    monkeypatch.setenv("FORNAX_SCORES_DB", str(tmp_path / "scores.sqlite"))
    base = make_base(tmp_path / "base")
    data = write_text(tmp_path / "corpus.txt", 6000)
    state = train(quick(data, tmp_path / "out", mode="full", model=str(base), steps=4))
    rows = History().rows()
    assert [(r.metric, r.backend, r.model, r.data) for r in rows] == [
        ("val_perplexity", "training", str(tmp_path / "out"), "corpus.txt")]
    assert rows[0].value == pytest.approx(state["val_loss"][-1][2])
    assert rows[0].model_fingerprint == model_fingerprint(backend.load(tmp_path / "out"))  # the saved model
    assert rows[0].settings["mode"] == "full" and rows[0].settings["source"] == "finetune"
