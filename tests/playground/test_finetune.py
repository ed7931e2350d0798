"""The Finetune tab's API (/finetune, /cancel_finetune) over gradio_client: a job starts, runs in its own process,
is the one the page shows, can be cancelled; bad input is a plain error and nothing is started."""
import math
import time

import pytest

from playground import build_app
from playground.render import loss_frame
from playground.tabs.finetune import manager
from tests.playground.serve import serving

gradio_client = pytest.importorskip("gradio_client")

FORM = dict(upload=None, mode="pretrain", task="auto", model="", preset="tiny-llama", steps=400, lr=0, batch_size=4,
            seq_len=64, lora_r=8, eval_every=50, sample_prompts="The with statement", out="")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FORNAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    with serving(build_app()) as url:
        yield gradio_client.Client(url, verbose=False)
    mp.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics.values())[:100_000])
    return path


def assert_plain_error(call, words):
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        call()
    assert words in str(e.value) and "Traceback" not in str(e.value)


def test_a_job_starts_is_shown_refuses_a_second_and_cancels(client, corpus, tmp_path):
    status, plot, samples, result = client.predict(data_path=str(corpus), **FORM, api_name="/finetune")
    job = manager().latest()
    assert job in status and "pretrain" in status and result == ""
    assert_plain_error(lambda: client.predict(data_path=str(corpus), **FORM, api_name="/finetune"),
                       "one training job runs at a time")
    deadline = time.monotonic() + 120
    while manager().state(job)["step"] < 3 and time.monotonic() < deadline:  # a few steps: something to resume
        time.sleep(0.2)
    client.predict(api_name="/cancel_finetune")
    state = manager().wait(job, timeout=120)
    assert state["status"] == "cancelled" and state["step"] < FORM["steps"]
    assert_plain_error(lambda: client.predict(api_name="/cancel_finetune"), "has already ended")
    # Resume: a new job that continues from the checkpoint the cancel saved, in the same folder
    status, *_ = client.predict(api_name="/resume_finetune")
    resumed = manager().latest()
    assert resumed != job and resumed in status
    client.predict(api_name="/cancel_finetune")
    again = manager().wait(resumed, timeout=120)
    assert again["out_dir"] == state["out_dir"] and again["config"]["resume"] is True
    # it went on from the checkpoint (its loss history carried over), not from scratch
    assert again["status"] == "cancelled" and again["step"] >= state["step"]
    assert again["train_loss"][:len(state["train_loss"])] == state["train_loss"]


@pytest.mark.parametrize("content, words", [(b"", "empty"), (bytes(range(256)) * 64, "binary"),
                                            (b'{"text": "a", "label": "x"}\n{oops\n', "line 2")])
def test_bad_data_is_a_plain_error_and_starts_nothing(client, tmp_path, content, words):
    path = tmp_path / ("data.jsonl" if b"{" in content else "data.txt")
    path.write_bytes(content)
    before = manager().jobs()
    assert_plain_error(lambda: client.predict(data_path=str(path), **FORM, api_name="/finetune"), words)
    assert manager().jobs() == before


def test_no_data_is_a_plain_error(client):
    assert_plain_error(lambda: client.predict(data_path="", **FORM, api_name="/finetune"), "choose training data")


def test_loss_frame_names_both_series_from_the_first_point():
    frame = loss_frame({"train_loss": [], "val_loss": [[0, 6.2, 493.0]]})
    assert sorted(frame["split"]) == ["train", "validation"]
    assert math.isnan(frame[frame.split == "train"]["loss"].iloc[0])
    assert loss_frame({"train_loss": [], "val_loss": []}) is None


def test_an_upload_is_kept_and_an_empty_model_box_means_the_loaded_model(client, corpus, tmp_path):
    """Gradio deletes uploads after an hour: the job trains on a copy in the Fornax cache. And a LoRA job with an
    empty model box finetunes the model loaded now (not the one loaded when the page was built)."""
    from playground import current
    from tests.backend.tiny import make_tiny

    make_tiny("llama", tmp_path / "tiny")
    current.load(str(tmp_path / "tiny"))
    form = {**FORM, "mode": "lora", "upload": gradio_client.handle_file(str(corpus)), "seq_len": 32}
    client.predict(data_path="", **form, api_name="/finetune")
    job = manager().latest()
    cfg = manager().state(job)["config"]
    client.predict(api_name="/cancel_finetune")
    assert manager().wait(job, timeout=120)["status"] == "cancelled"
    assert cfg["model"] == str(tmp_path / "tiny") and cfg["mode"] == "lora"
    kept = cfg["data"]
    assert "train-data" in kept and open(kept).read() == corpus.read_text()


def test_a_public_deployment_takes_uploads_only(client, corpus, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/fornax")
    before = manager().jobs()
    assert_plain_error(lambda: client.predict(data_path=str(corpus), **FORM, api_name="/finetune"), "upload only")
    assert manager().jobs() == before
