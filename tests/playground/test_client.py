"""The playground's API through gradio_client, on the real default model: the same text as the backend called
directly, Stop, two users at once, and bad input answered in plain words with the app still working after."""
import re
import time

import pytest

from playground import create_app, current
from playground.tabs.chat import message_text
from tests.playground.serve import PANEL, backend_kwargs, serving

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

PROMPT = "The most useful kitchen tool is"
COUNTING = "1, 2, 3, 4, 5, 6,"  # greedy SmolLM2 keeps counting: a generation that runs until stopped


@pytest.fixture(scope="module")
def url():
    with serving(create_app("default")) as app_url:
        yield app_url


@pytest.fixture(scope="module")
def client(url):
    return gradio_client.Client(url, verbose=False)


@pytest.fixture
def handle():
    return current.handle


def complete(client, prompt=PROMPT, **panel):
    return client.predict(prompt=prompt, **{**PANEL, **panel}, api_name="/complete")


def test_complete_matches_backend(client, handle):
    text, tokens_html, stats = complete(client)
    expected = handle.generate(PROMPT, **backend_kwargs())
    assert text == expected.text and text.strip()
    # One coloured span per generated token, each with its top-5 alternatives in a tooltip.
    assert len(re.findall(r"class='fx-tok( fx-cut)?'", tokens_html)) == len(expected.completions[0].tokens)
    assert tokens_html.count("class='fx-alt") >= 5 * len(expected.completions[0].tokens)
    for needle in ("TTFT", "tok/s", "GB/s", "seed 1234", "eager"):
        assert needle in stats


def test_complete_with_samples_and_stop_string_matches_backend(client, handle):
    text, tokens_html, _ = complete(client, num_samples=2, stop=["\\n"], seed=99, max_new_tokens=10)
    expected = handle.generate(PROMPT, **backend_kwargs(num_samples=2, stop=["\\n"], seed=99, max_new_tokens=10))
    assert text == "── sample 1 ──\n" + expected.texts[0] + "\n\n── sample 2 ──\n" + expected.texts[1]
    assert "\n" not in expected.texts[0] + expected.texts[1]
    assert tokens_html.count("fx-sample-head") == 2


def test_chat_and_regenerate_match_backend(client, handle):
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]}]
    shown, box, stats = client.predict(message="Name one colour.", history=history, system_prompt="Be brief.",
                                       **PANEL, api_name="/chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name one colour."}]
    expected = handle.generate(messages, **backend_kwargs())
    assert [m["role"] for m in shown] == ["user", "assistant", "user", "assistant"]
    assert message_text(shown[-1]["content"]) == expected.text and expected.text.strip()
    assert box == "" and "tok/s" in stats

    # Regenerate drops the last reply and answers again: with the same seed, the same reply.
    again, _ = client.predict(history=shown, system_prompt="Be brief.", **PANEL, api_name="/regenerate")
    assert len(again) == 4 and message_text(again[-1]["content"]) == expected.text


def test_chat_samples_show_as_extra_messages_that_do_not_enter_the_context(client, handle):
    shown, _, _ = client.predict(message="Say hello.", history=[], system_prompt="", **{**PANEL, "num_samples": 2},
                                 api_name="/chat")
    expected = handle.generate([{"role": "user", "content": "Say hello."}], **backend_kwargs(num_samples=2))
    assert [message_text(m["content"]) for m in shown[1:]] == expected.texts
    assert shown[2]["metadata"]["title"] == "sample 2 of 2"
    # Next turn: only sample 1 is part of the conversation the model sees.
    follow, _, _ = client.predict(message="Again.", history=shown, system_prompt="", **PANEL, api_name="/chat")
    context = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": expected.texts[0]},
               {"role": "user", "content": "Again."}]
    assert message_text(follow[-1]["content"]) == handle.generate(context, **backend_kwargs()).text


def test_clear_empties_the_chat(client):
    assert client.predict(api_name="/clear") == ([], "")


def wait_for(condition, what, timeout=60):
    """Poll until condition() holds; the timeout only guards against a hang, it measures nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def streamed_text(job):
    outputs = job.outputs()
    return outputs[-1][0] if outputs else ""


def wait_for_streamed_text(job, longer_than=""):
    """Wait until the job has streamed more text than `longer_than` (so it was still generating) and return it."""
    wait_for(lambda: len(streamed_text(job)) > len(longer_than), "no (more) streamed text arrived")
    return streamed_text(job)


def test_stop_ends_a_long_generation_and_keeps_its_text(client, handle):
    job = client.submit(prompt=COUNTING, **{**PANEL, "temperature": 0, "max_new_tokens": 400}, api_name="/complete")
    wait_for_streamed_text(job)
    client.predict(api_name="/stop")
    text, tokens_html, stats = job.result(timeout=60)        # (a guard against a hang, not a time limit)
    assert "stopped" in stats and "tok/s" in stats           # Stop ended the run, not its 400 tokens; timings intact
    full = handle.generate(COUNTING, **backend_kwargs(temperature=0, max_new_tokens=400)).text
    assert text and len(text) < len(full) and full.startswith(text)
    assert tokens_html.count("fx-tok") >= 2                  # the tokens generated before Stop, coloured


def test_clear_during_a_reply_ends_that_reply_on_the_emptied_chat(client):
    # The run's last output is what Gradio sends when it ends, and that can reach the page after Clear's own
    # answer: it must be the emptied chat, not the discarded partial reply.
    job = client.submit(message="Count from 1 to 200, separated by commas.", history=[], system_prompt="",
                        **{**PANEL, "temperature": 0, "max_new_tokens": 400}, api_name="/chat")
    wait_for(lambda: job.outputs() and len(job.outputs()[-1][0]) == 2, "no reply streamed")
    assert client.predict(api_name="/clear") == ([], "")
    shown, box, stats = job.result(timeout=60)               # (a guard against a hang, not a time limit)
    assert shown == [] and stats == ""


def test_two_users_neither_blocked_nor_mixed_up(url, handle):
    alice, bob = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    long_job = alice.submit(prompt=COUNTING, **{**PANEL, "temperature": 0, "max_new_tokens": 400},
                            api_name="/complete")
    wait_for_streamed_text(long_job)
    # While Alice generates, Bob's page still answers, and his Stop is his own: Alice's text keeps growing after
    # both calls came back, so they did not wait for her run to end, nor did his Stop end it.
    assert bob.predict(api_name="/clear") == ([], "")
    bob.predict(api_name="/stop")
    wait_for_streamed_text(long_job, longer_than=streamed_text(long_job))
    assert not long_job.done()
    # Bob's generation waits in the queue (Alice's keeps streaming meanwhile), then gets exactly his own text.
    bob_job = bob.submit(prompt="Once upon a time", **{**PANEL, "seed": 5}, api_name="/complete")
    wait_for(lambda: bob_job.status().code == Status.IN_QUEUE, "Bob's generation never queued")
    wait_for_streamed_text(long_job, longer_than=streamed_text(long_job))
    assert not long_job.done() and not bob_job.done()
    alice.predict(api_name="/stop")
    assert "stopped" in long_job.result(timeout=60)[2]       # her own Stop ended it, not her 400 tokens
    assert bob_job.result(timeout=60)[0] == handle.generate("Once upon a time", **backend_kwargs(seed=5)).text


def test_concurrent_requests_each_get_their_own_text(url, handle):
    clients = [gradio_client.Client(url, verbose=False) for _ in range(3)]
    jobs = [c.submit(prompt=f"Fact number {i}:", **{**PANEL, "seed": i, "max_new_tokens": 6}, api_name="/complete")
            for i, c in enumerate(clients)]
    for i, job in enumerate(jobs):
        expected = handle.generate(f"Fact number {i}:", **backend_kwargs(seed=i, max_new_tokens=6)).text
        assert job.result(timeout=60)[0] == expected


BAD_CALLS = {
    "nonexistent path": (dict(source="/no/such/model", api_name="/load"), "no model at"),
    "hub id not cached, offline": (dict(source="nobody/no-such-model", api_name="/load"),
                                   "not in the local Hugging Face cache"),
    "empty prompt": (dict(prompt="", **PANEL, api_name="/complete"), "the prompt is empty"),
    "empty message": (dict(message="  ", history=[], system_prompt="", **PANEL, api_name="/chat"),
                      "the message is empty"),
    "negative temperature": (dict(prompt=PROMPT, **{**PANEL, "temperature": -1}, api_name="/complete"),
                             "temperature must be"),
    "top_p above 1": (dict(prompt=PROMPT, **{**PANEL, "top_p": 5}, api_name="/complete"), "top_p must be"),
    "zero new tokens": (dict(prompt=PROMPT, **{**PANEL, "max_new_tokens": 0}, api_name="/complete"),
                        "max_new_tokens must be"),
    "beyond the context": (dict(prompt=PROMPT, **{**PANEL, "max_new_tokens": 10**5}, api_name="/complete"),
                           "context"),
    "too many samples": (dict(prompt=PROMPT, **{**PANEL, "num_samples": 100}, api_name="/complete"),
                         "num_samples must be"),
    "negative seed": (dict(prompt=PROMPT, **{**PANEL, "seed": -7}, api_name="/complete"), "seed must be"),
    "unknown backend": (dict(prompt=PROMPT, **{**PANEL, "runner_name": "warp-drive"}, api_name="/complete"),
                        "no backend 'warp-drive'"),
    "nothing to regenerate": (dict(history=[], system_prompt="", **PANEL, api_name="/regenerate"),
                              "nothing to regenerate"),
}


def assert_plain_error(call, words):
    with pytest.raises(AppError) as info:
        call()
    message = info.value.message
    assert words in message, message
    assert "Traceback" not in message and 'File "' not in message


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_a_plain_error_and_the_app_keeps_working(client, handle, case):
    kwargs, words = BAD_CALLS[case]
    assert_plain_error(lambda: client.predict(**kwargs), words)
    assert current.handle is handle  # a failed load leaves the old model serving
    assert complete(client, max_new_tokens=4)[0] == handle.generate(PROMPT, **backend_kwargs(max_new_tokens=4)).text


def test_corrupt_gguf_is_a_plain_error(client, handle, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert_plain_error(lambda: client.predict(source=str(corrupt), api_name="/load"), "corrupt.gguf")
    upload = gradio_client.handle_file(str(corrupt))
    assert_plain_error(lambda: client.predict(file=upload, api_name="/load_upload"), "corrupt.gguf")
    assert current.handle is handle
    assert complete(client, max_new_tokens=4)[0] == handle.generate(PROMPT, **backend_kwargs(max_new_tokens=4)).text


def test_unexpected_errors_are_reported_without_a_traceback(client, handle, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(handle, "stream", broken)
    assert_plain_error(lambda: complete(client), "something went wrong (RuntimeError: simulated failure)")
    monkeypatch.undo()
    assert complete(client, max_new_tokens=4)[0] == handle.generate(PROMPT, **backend_kwargs(max_new_tokens=4)).text


def test_streaming_sends_small_diffs_at_a_throttled_rate(url):
    """Per update the page receives only the new text (Gradio diffs streamed outputs), never the whole history
    again, and at most ~15 updates a second. Read off the wire: the queue's server-sent events."""
    import json

    import httpx

    from playground.streaming import UI_UPDATE_INTERVAL_S

    config = httpx.get(url + "config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")
    # 20 KB of history in few tokens (runs of dashes merge into long tokens), so the prefill stays short.
    long_history = [{"role": "user", "content": [{"type": "text", "text": "-" * 10_000}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "=" * 10_000}]}]
    panel = {**PANEL, "max_new_tokens": 30, "stop": []}
    data = ["Tell me a story.", long_history, "", *(panel[k] for k in (
        "runner_name", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
        "presence_penalty", "frequency_penalty", "stop", "seed", "num_samples")), None, False]  # tree, trim
    joined = httpx.post(url + "gradio_api/queue/join", json=dict(data=data, fn_index=fn_index, session_hash="wire",
                                                                 event_data=None, trigger_id=None))
    assert joined.status_code == 200
    updates, started = [], time.monotonic()
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": "wire"}, timeout=60) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_generating":
                updates.append(len(line))
            if message.get("msg") == "process_completed":
                assert message["success"], message
                break
    elapsed = time.monotonic() - started
    assert updates[0] > 20_000  # the first update carries the history once
    assert len(updates) > 3 and max(updates[1:]) < 1_000
    assert len(updates) <= 4 + elapsed / UI_UPDATE_INTERVAL_S
