"""Bad training input: every case is a TrainError with a plain message, and nothing is left in the output folder."""
import json

import pytest

from backend import FornaxError
from backend.__main__ import main
from backend.errors import TrainError
from backend.training import TrainConfig, train
from tests.backend.train_util import labelled_rows, make_base, quick, write_jsonl, write_text


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama", context=128)


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


CASES = {
    "empty file": ("data.txt", b"", {}, "is empty"),
    "only whitespace": ("data.txt", b"  \n\n\t\n", {}, "is empty"),
    "binary file": ("data.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, r"binary file \(a NUL byte at offset 8\)"),
    "not UTF-8": ("data.txt", "caf\u00e9 au lait".encode("latin-1"), {}, "not UTF-8 text"),
    "malformed JSONL line": ("data.jsonl", _lines({"text": "a b", "label": "x"}, {"text": "c", "label": "y"},
                                                  '{"text": "oops", "label": }').encode(), {},
                             "data.jsonl line 3 is not valid JSON"),
    "label missing in JSONL": ("data.jsonl", _lines({"text": "a", "label": "x"}, {"text": "b"}).encode(), {},
                               "line 2 has no label"),
    "label empty in CSV": ("data.csv", b"text,label\nhello,pos\nworld,\n", {}, "data.csv line 3 has no label"),
    "no label column in CSV": ("data.csv", b"text,sentiment\nhello,pos\n", {}, "must have 'text' and 'label'"),
    "one label only": ("data.jsonl", _lines({"text": "a", "label": "x"}, {"text": "b", "label": "x"}).encode(), {},
                       "only the label 'x'"),
    "chat without assistant": ("data.jsonl", _lines({"messages": [{"role": "user", "content": "hi"}]}).encode(), {},
                               "line 1 has no assistant message"),
    "chat message malformed": ("data.jsonl", _lines({"messages": [{"role": "user"}]}).encode(), {},
                               r"line 1: message 1 must be"),
    "plain text for chat": ("data.txt", b"just some text\n", {"task": "chat"}, "task 'chat' needs JSONL"),
    "shorter than one block": ("data.txt", b"Hello there, world.", {}, "shorter than one training block of 33 tokens"),
    "seq_len beyond context": ("data.txt", None, {"seq_len": 200}, "seq_len 200 is beyond the model's context of 128"),
    "unknown LoRA target": ("data.txt", None, {"mode": "lora", "lora_targets": ["mlp.up"]},
                            r"mlp.up are not in this llama model; its projections are attn.qkv, attn.proj"),
    "missing file": (None, None, {}, "no data file at"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_train_error_and_leaves_no_output(case, base, tmp_path):
    name, content, overrides, message = CASES[case]
    if name is None:
        data = tmp_path / "nowhere.txt"
    elif content is None:
        data = write_text(tmp_path / name, 3000)
    else:
        data = tmp_path / name
        data.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(TrainError, match=message):
        train(quick(data, out, **{"mode": "full", "model": str(base), **overrides}))
    assert not out.exists()


def test_bad_settings(tmp_path):
    ok = dict(data="x.txt", out=str(tmp_path / "o"))
    for bad, message in [({"steps": 0}, "steps must be a positive integer"), ({"mode": "qlora"}, "mode must be one"),
                         ({"lr": 5.0}, r"lr must be in \(0, 1\)"), ({"val_fraction": 1.0}, "val_fraction"),
                         ({"preset": "huge", "mode": "pretrain"}, "no preset 'huge'"),
                         ({"seq_len": 1}, "seq_len must be an integer >= 2")]:
        with pytest.raises(TrainError, match=message):
            TrainConfig(**ok, **bad).check()
    with pytest.raises(TrainError, match="unknown training option.*learning_rate"):
        TrainConfig.from_dict({**ok, "learning_rate": 1e-3})
    cfg = TrainConfig(**ok, lora_targets=["attn.qkv"], sample_prompts=["Hi"], lr=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_non_empty_output_folder_is_refused_untouched(base, tmp_path):
    data = write_text(tmp_path / "corpus.txt", 3000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(TrainError, match="exists and is not empty"):
        train(quick(data, out, mode="full", model=str(base)))
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    with pytest.raises(TrainError, match="could not load the model"):
        train(quick(data, tmp_path / "out2", mode="full", model=str(tmp_path / "no-such-model")))
    assert not (tmp_path / "out2").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(4) + [{"text": "no label here"}])
    code = main(["finetune", "--data", str(data), "--out", str(tmp_path / "out"), "--mode", "full", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "error: rows.jsonl line 5 has no label" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert isinstance(TrainError("x"), FornaxError)
