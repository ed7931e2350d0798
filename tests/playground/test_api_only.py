"""`python -m playground --api-only` as a user starts it: a real subprocess on a tiny model, driven by the official
`openai` client and by the README's own `curl` examples (run as written, only the port changed); its answers equal
the backend's for the same seed, and it shuts down cleanly."""
import json
import re
import shlex
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import backend
from tests.backend.tiny import make_tiny
from tests.playground.serve import api_only_server

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
README_BASE = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", path)
    return path


@pytest.fixture(scope="module")
def served(folder, tmp_path_factory):
    """(base URL, process, log) of `python -m playground --api-only --model <folder> --port <free>`."""
    with api_only_server(folder, tmp_path_factory.mktemp("logs") / "api-only.log") as server:
        yield server


@pytest.fixture(scope="module")
def handle(folder):
    return backend.load(str(folder))  # the same folder in this process: the reference answers


def test_the_openai_client_chats_streamed_and_not(served, handle):
    base, _, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    messages = [{"role": "user", "content": "Name a river."}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, seed=5,
                                       temperature=0.8)
    want = handle.generate(messages, max_new_tokens=10, seed=5, temperature=0.8)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == want.timings.new_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, seed=5, temperature=0.8, stream=True) if c.choices)
    assert streamed == want.text


def test_only_the_api_is_served(served):
    base, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/", timeout=10)
    assert e.value.code == 404


def readme_curls() -> list[list[str]]:
    """The curl commands of docs/api.md's OpenAI-compatible API section (moved there from the README), each as an
    argument list."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("## OpenAI-compatible API"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = re.sub(r"\\\n\s*", " ", block).strip().splitlines()
    assert commands and all(c.startswith("curl ") for c in commands)
    return [shlex.split(c) for c in commands]


def sse_chunks(text: str) -> list:
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_the_readme_curl_examples_answer_as_documented(served, handle):
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    base, _, _ = served
    answers = []
    for argv in readme_curls():
        argv = [a.replace(README_BASE, base) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        bodies = [json.loads(a) for a in argv if a.startswith("{")]
        answers.append((argv, bodies[0] if bodies else None, done.stdout))
    assert len(answers) == 3
    (_, _, models), (_, chat_body, chat), (_, completion_body, completion) = answers
    assert [m["id"] for m in json.loads(models)["data"]] == ["tiny-llama"]

    chat = json.loads(chat)
    want = handle.generate(chat_body["messages"], max_new_tokens=chat_body["max_tokens"],
                           temperature=chat_body["temperature"])
    assert chat["choices"][0]["message"]["content"] == want.text
    assert chat["usage"]["prompt_tokens"] == want.timings.prompt_tokens

    texts = [""] * completion_body["n"]
    for chunk in sse_chunks(completion):
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    want = handle.generate(completion_body["prompt"], max_new_tokens=completion_body["max_tokens"],
                           seed=completion_body["seed"], num_samples=completion_body["n"], temperature=1.0)
    assert texts == want.texts and texts[0] != texts[1]


def test_it_shuts_down_cleanly(served):
    _, proc, log = served
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, and so do we
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text() and log.read_text().rstrip().endswith("playground: stopped")
