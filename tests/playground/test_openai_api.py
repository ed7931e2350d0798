"""The OpenAI-compatible API through the official `openai` client, against the playground served with its API on a
tiny model: every answer equals the backend's for the same seed; errors come back OpenAI-shaped; public caps hold."""
import json
import urllib.request

import pytest

from playground import build_app, current
from playground.openai_api import server
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving_asgi

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
PROMPT = "The with statement"
SAMPLING = dict(temperature=0.9, top_p=0.9, presence_penalty=0.2, frequency_penalty=0.3, seed=7)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    current.load(str(folder))
    with serving_asgi(server(build_app())) as app_url:
        yield app_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "v1", api_key="not-needed", max_retries=0)


def expected(prompt, max_tokens=12, n=1, stop=(), top_logprobs=0, **sampling):
    return current.handle.generate(prompt, **{**SAMPLING, **sampling}, max_new_tokens=max_tokens, num_samples=n,
                                   stop=list(stop), top_logprobs=top_logprobs)


def test_models_lists_the_loaded_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]


def test_chat_matches_backend(client):
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=12, **SAMPLING)
    want = expected(MESSAGES)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    finish = {"eos": "stop", "stop": "stop", "length": "length"}[want.completions[0].finish_reason]
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(current.handle.encode(MESSAGES)) == want.timings.prompt_tokens
    assert r.usage.completion_tokens == want.timings.new_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "tiny-llama" and r.object == "chat.completion"


def test_chat_streamed_matches_backend_with_n_2_and_usage(client):
    chunks = list(client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=12, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLING))
    texts, finish = ["", ""], [None, None]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    want = expected(MESSAGES, n=2)
    assert texts == want.texts and texts[0] != texts[1]
    assert all(f in ("stop", "length") for f in finish)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.timings.new_tokens


def test_completion_matches_backend_streamed_and_not(client):
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, n=2, **SAMPLING)
    want = expected(PROMPT, n=2)
    assert [c.text for c in r.choices] == want.texts and r.object == "text_completion"
    streamed = ["", ""]
    for c in client.completions.create(model="x", prompt=PROMPT, max_tokens=12, n=2, stream=True, **SAMPLING):
        for choice in c.choices:
            streamed[choice.index] += choice.text
    assert streamed == want.texts


def test_stop_string_ends_the_text(client):
    free = expected(PROMPT, max_tokens=24, temperature=0)
    stop = free.text[5:7]  # two characters the free run produces: with them as a stop string it ends before them
    assert len(stop) == 2
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=24, stop=[stop],
                                  **{**SAMPLING, "temperature": 0})
    want = expected(PROMPT, max_tokens=24, stop=[stop], temperature=0)
    assert r.choices[0].text == want.text and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop" and free.text.startswith(r.choices[0].text)


def test_seed_reproduces_and_another_seed_differs(client):
    def ask(seed):
        r = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=16,
                                           **{**SAMPLING, "temperature": 1.5, "seed": seed})
        return r.choices[0].message.content
    assert ask(3) == ask(3) == expected(MESSAGES, max_tokens=16, temperature=1.5, seed=3).text
    assert ask(3) != ask(4)


def test_logprobs_equal_the_backends(client):
    r = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3,
                                       **SAMPLING)
    want = expected(MESSAGES, max_tokens=8, top_logprobs=3).completions[0].tokens
    got = r.choices[0].logprobs.content
    assert [t.token for t in got] == [t.text for t in want]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-6)
    assert [[a.token for a in t.top_logprobs] for t in got] == [[s for _, s, _ in t.top] for t in want]
    c = client.completions.create(model="x", prompt=PROMPT, max_tokens=8, logprobs=2, **SAMPLING)
    want = expected(PROMPT, max_tokens=8, top_logprobs=2).completions[0].tokens
    assert c.choices[0].logprobs.token_logprobs == pytest.approx([t.logprob for t in want], abs=1e-6)
    assert c.choices[0].logprobs.top_logprobs == [{s: pytest.approx(lp, abs=1e-6) for _, s, lp in t.top} for t in want]


def test_over_long_prompt_is_a_400_in_openai_shape(client, url):
    long = "word " * 400  # far beyond the tiny model's 128-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=long, max_tokens=4)
    error = e.value.body
    assert e.value.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "context" in error["message"] and "128" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="context is 128"):  # refused before any event, streamed too
        list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": long}], stream=True))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=MESSAGES, top_p=5)
    assert "top_p" in e.value.body["message"] and e.value.body["param"] == "top_p"
    request = urllib.request.Request(url + "v1/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request)
    assert raw.value.code == 400 and "JSON" in json.loads(raw.value.read())["error"]["message"]


def test_public_caps_apply_to_the_api(client, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("FORNAX_MAX_NUM_SAMPLES", "2")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=PROMPT, max_tokens=9)
    assert e.value.body["param"] == "max_tokens" and "at most 8" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=PROMPT, max_tokens=4, n=3)
    assert e.value.body["param"] == "n"
    # Within the caps it answers; without max_tokens the cap is the default budget.
    r = client.completions.create(model="x", prompt=PROMPT, **{**SAMPLING, "temperature": 0})
    assert r.usage.completion_tokens <= 8


def test_the_playground_still_serves_beside_the_api(url):
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.status == 200 and b"gradio" in page.read().lower()
    gradio_client = pytest.importorskip("gradio_client")
    greedy = dict(temperature=0, presence_penalty=0, frequency_penalty=0)
    text, _, _ = gradio_client.Client(url, verbose=False).predict(prompt=PROMPT, max_new_tokens=6, **greedy,
                                                                  api_name="/complete")
    assert text == expected(PROMPT, max_tokens=6, **greedy).text
