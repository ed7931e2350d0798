"""Public mode (FORNAX_PUBLIC=1) through gradio_client, as a hostile visitor meets it: no server path is loadable
and the refusal never says whether the path exists; uploads and sampling values over the caps are refused in plain
words whatever the client sends; a second visitor can neither cancel nor see the first's training job."""
import os
import time

import pytest

from backend import limits
from playground import build_app, choose_mode, current, launch_options
from playground.tabs.finetune import manager, poll
from tests.backend.tiny import make_tiny
from tests.playground.serve import PANEL, serving

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

UPLOAD_CAP = 64 * 1024  # Gradio's max_file_size, fixed at launch
FORM = dict(upload=None, data_path="", mode="pretrain", task="auto", model="", preset="tiny-llama", steps=400, lr=0, batch_size=4,
            seq_len=64, lora_r=8, eval_every=50, sample_prompts="The with statement", out="")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    return folder


@pytest.fixture(scope="module")
def url(tiny, tmp_path_factory):
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("FORNAX_PUBLIC", "1")
    mp.setenv("FORNAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("FORNAX_MAX_UPLOAD_BYTES", str(UPLOAD_CAP))
    mp.setenv("HF_TOKEN", "hf_server_secret")
    mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    mp.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "0")  # (so that undo() removes what public mode sets)
    current.load(str(tiny))  # the operator's choice at start-up: not a visitor's
    with serving(build_app()) as app_url:
        yield app_url
    mp.undo()


@pytest.fixture(scope="module")
def client(url):
    return gradio_client.Client(url, verbose=False)


def refused(call) -> str:
    with pytest.raises(AppError) as e:
        call()
    message = str(e.value)
    assert "Traceback" not in message and 'File "' not in message
    return message


def still_serving(client):
    text, _, stats = client.predict(prompt="The", **{**PANEL, "max_new_tokens": 3}, api_name="/complete")
    assert "tok/s" in stats


def test_a_server_path_is_refused_the_same_way_whether_it_exists_or_not(client, tiny, tmp_path):
    messages = {source: refused(lambda: client.predict(source=source, dtype="auto", api_name="/load"))
                for source in (str(tiny), str(tmp_path / "no-such-model"), "/etc/passwd", "/etc/no-such-file",
                               "someone/not-allowed", "../../etc")}
    assert len(set(messages.values())) == 1, messages
    assert "paths on the server are not available" in messages["/etc/passwd"]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in messages["/etc/passwd"]  # the allowlist it names
    # the finetune tab's model box follows the same rule
    data = tmp_path / "corpus.txt"
    data.write_text("hello world. " * 500)
    form = {**FORM, "mode": "lora", "model": str(tiny), "upload": gradio_client.handle_file(str(data))}
    assert refused(lambda: client.predict(**form, api_name="/finetune")) == messages[str(tiny)]
    still_serving(client)


def test_an_over_cap_upload_is_refused(client, tmp_path, monkeypatch):
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + bytes(UPLOAD_CAP + 1000))
    with pytest.raises(Exception) as e:  # Gradio's max_file_size: refused at the upload, never written
        client.predict(file=gradio_client.handle_file(str(big)), dtype="auto", api_name="/load_upload")
    assert "size" in str(e.value).lower()
    # and our own check, for a file Gradio let through (a cap lowered after launch stands in for any other route)
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" + bytes(3000))
    monkeypatch.setenv("FORNAX_MAX_UPLOAD_BYTES", "2000")
    message = refused(lambda: client.predict(file=gradio_client.handle_file(str(small)), dtype="auto",
                                             api_name="/load_upload"))
    assert "3,004" in message and "at most 2,000" in message and "public" in message
    data = tmp_path / "data.txt"
    data.write_text("x" * 3000)
    message = refused(lambda: client.predict(**{**FORM, "upload": gradio_client.handle_file(str(data))},
                                             api_name="/finetune"))
    assert "training data" in message and "at most 2,000" in message
    monkeypatch.delenv("FORNAX_MAX_UPLOAD_BYTES")
    still_serving(client)


@pytest.mark.parametrize("panel, words", [
    (dict(max_new_tokens=5000), "max_new_tokens is 5,000 but this public deployment allows at most 1,024"),
    (dict(num_samples=16), "num_samples is 16 but this public deployment allows at most 4"),
    (dict(stop=[f"s{i}" for i in range(20)]), "the number of stop strings is 20"),
    (dict(stop=["x" * 500]), "a stop string's length in characters is 500"),
])
def test_over_cap_sampling_values_are_refused(client, panel, words):
    for api_name, call in (("/complete", dict(prompt="The")), ("/chat", dict(message="Hi", history=[],
                                                                               system_prompt=""))):
        message = refused(lambda: client.predict(**call, **{**PANEL, **panel}, api_name=api_name))
        assert words in message, message
    still_serving(client)


@pytest.mark.parametrize("path", ["onnx-int8", "compiled"])
def test_a_visitor_cannot_make_the_server_export_or_compile_by_naming_a_path(client, path):
    """Chat / Completion / Race on a path that is not prepared would export or compile under the model lock."""
    exports = os.listdir(os.environ["FORNAX_CACHE"])
    for api_name, call in (("/complete", dict(prompt="The")), ("/chat", dict(message="Hi", history=[],
                                                                               system_prompt=""))):
        message = refused(lambda: client.predict(**call, **{**PANEL, "runner_name": path}, api_name=api_name))
        assert f"the {path} path is not prepared on this server" in message, message
    assert path not in current.handle.runners
    assert os.listdir(os.environ["FORNAX_CACHE"]) == exports  # nothing exported into the cache
    still_serving(client)


def test_an_over_cap_prompt_or_history_is_refused(client):
    cap = limits.current().max_prompt_chars
    assert "the prompt's length" in refused(lambda: client.predict(prompt="a" * (cap + 1), **PANEL,
                                                                   api_name="/complete"))
    history = [{"role": role, "content": [{"type": "text", "text": letter * (cap // 2)}]}
               for role, letter in (("user", "b"), ("assistant", "c"))]
    assert "the prompt's length" in refused(lambda: client.predict(message="and?", history=history,
                                                                   system_prompt="", **PANEL, api_name="/chat"))


def test_a_second_visitor_cannot_cancel_or_see_the_first_ones_job(url, client, tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics.values())[:60_000])
    first, second = client, gradio_client.Client(url, verbose=False)
    assert "upload only" in refused(lambda: first.predict(**{**FORM, "data_path": str(corpus)}, api_name="/finetune"))
    first.predict(**{**FORM, "upload": gradio_client.handle_file(str(corpus))}, api_name="/finetune")
    job = manager().latest()
    deadline = time.monotonic() + 120
    while not manager().state(job)["samples"] and time.monotonic() < deadline:  # the "before" samples exist
        time.sleep(0.2)
    assert "no training job of yours to cancel" in refused(lambda: second.predict(api_name="/cancel_finetune"))
    assert "no training job of yours to resume" in refused(lambda: second.predict(api_name="/resume_finetune"))
    busy = refused(lambda: second.predict(**{**FORM, "upload": gradio_client.handle_file(str(corpus))},
                                          api_name="/finetune"))
    assert "one training job runs at a time" in busy and manager().state(job)["out_dir"] not in busy
    assert manager().state(job)["status"] in ("starting", "running")
    # What each page shows (the poll is not an API endpoint): the owner its samples, anyone else only "running".
    import gradio as gr

    def page_of(c):  # a poll as that client's page makes it: its session and the visitor cookie it holds
        cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
        return gr.Request(session_hash=c.session_hash, headers={"cookie": cookie} if cookie else {})

    mine, theirs = poll(page_of(first)), poll(page_of(second))
    assert job in mine[0] and "The with statement" in mine[2] and mine[1] is not None
    assert "another visitor" in theirs[0] and job not in theirs[0] and theirs[1] is None
    assert "The with statement" not in theirs[2]
    status, *_ = first.predict(api_name="/cancel_finetune")
    assert job in status and manager().wait(job, timeout=120)["status"] == "cancelled"


def test_public_mode_is_chosen_for_a_space_or_beyond_loopback_and_flags_win(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("FORNAX_PUBLIC", raising=False)
    assert choose_mode(None, "127.0.0.1") is False and os.environ["FORNAX_PUBLIC"] == "0"
    monkeypatch.delenv("FORNAX_PUBLIC")
    assert choose_mode(None, "localhost") is False
    monkeypatch.delenv("FORNAX_PUBLIC")
    assert choose_mode(None, "0.0.0.0") is True and limits.public_mode()
    monkeypatch.delenv("FORNAX_PUBLIC")
    assert choose_mode(None, "::1") is False
    monkeypatch.delenv("FORNAX_PUBLIC")
    monkeypatch.setenv("SPACE_ID", "someone/fornax")
    assert choose_mode(None, "127.0.0.1") is True
    assert choose_mode(False, "0.0.0.0") is False and not limits.public_mode()  # --private wins
    monkeypatch.delenv("SPACE_ID")
    assert choose_mode(True, "127.0.0.1") is True  # --public wins


def test_the_command_line_takes_public_and_private(monkeypatch):
    import argparse

    from playground import __main__ as cli

    seen = {}
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, argv=None: seen.setdefault("args", argparse.ArgumentParser.parse_known_args(
                            self, argv)[0]) and (_ for _ in ()).throw(SystemExit(0)))
    for argv, expected in ((["--public"], True), (["--private"], False), ([], None)):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert seen["args"].public is expected


def test_visitors_never_send_the_servers_hub_token_and_uploads_are_capped_at_launch(url):
    from huggingface_hub.utils import get_token_to_send

    assert os.environ["HF_TOKEN"] == "hf_server_secret" and get_token_to_send(None) is None
    assert launch_options()["max_file_size"] == UPLOAD_CAP


def test_every_generation_has_the_public_time_limit(url):
    limits_by_event = {f.api_name: f.time_limit for f in build_app().fns.values()
                       if f.api_name in ("chat", "regenerate", "complete")}
    assert limits_by_event == dict.fromkeys(("chat", "regenerate", "complete"), limits.current().event_time_limit_s)
    assert limits.current().event_time_limit_s > 0
