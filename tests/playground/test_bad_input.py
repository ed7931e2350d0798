"""The playground's rows of the bad-input catalogue (issue #10): each input, sent through the API as a hostile or
careless client would, gets a plain message naming the problem (no traceback), and the app keeps serving.

Rows: (mode, api_name, arguments, fragment of the expected message). `private` is a local user's playground,
`public` a Space (FORNAX_PUBLIC=1) with its caps."""
import pytest

from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import PANEL, serving

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

FORM = dict(upload=None, data_path="", mode="pretrain", task="auto", model="", preset="tiny-llama", steps=10, lr=0,
            batch_size=4, seq_len=32, lora_r=8, eval_every=0, sample_prompts="", out="")
CHAT = dict(message="Hi", history=[], system_prompt="")

CATALOGUE = [
    # generation
    ("private", "/complete", dict(prompt="   ", **PANEL), "the prompt is empty"),
    ("private", "/chat", dict(**{**CHAT, "message": ""}, **PANEL), "the message is empty"),
    ("private", "/regenerate", dict(history=[], system_prompt="", **PANEL), "nothing to regenerate"),
    ("private", "/complete", dict(prompt="The", **{**PANEL, "top_p": 5}), "top_p"),
    ("private", "/complete", dict(prompt="The", **{**PANEL, "temperature": -1}), "temperature"),
    ("private", "/complete", dict(prompt="The", **{**PANEL, "num_samples": 0}), "num_samples"),
    ("private", "/complete", dict(prompt="The", **{**PANEL, "runner_name": "no-such-backend"}), "no-such-backend"),
    ("public", "/complete", dict(prompt="The", **{**PANEL, "max_new_tokens": 100_000}), "max_new_tokens is 100,000"),
    ("public", "/chat", dict(**CHAT, **{**PANEL, "num_samples": 12}), "num_samples is 12"),
    ("public", "/complete", dict(prompt="The", **{**PANEL, "stop": ["\\n"] * 9}), "the number of stop strings is 9"),
    ("private", "/race", dict(prompt="", paths=["eager"], greedy=True, **PANEL), "the prompt is empty"),
    ("private", "/race", dict(prompt="The", paths=[], greedy=True, **PANEL), "tick at least one path"),
    ("private", "/race", dict(prompt="The", paths=["no-such-path"], greedy=True, **PANEL), "no-such-path"),
    ("public", "/race", dict(prompt="The", paths=["eager"], greedy=False, **{**PANEL, "max_new_tokens": 100_000}),
     "max_new_tokens is 100,000"),
    # encoders (a causal model is loaded here)
    ("private", "/fill_mask", dict(text="The [MASK] is here.", top_k=5), "fill-mask needs an encoder"),
    ("private", "/fill_mask", dict(text="The [MASK] is here.", top_k=2.5), "top-k must be a whole number"),
    ("public", "/fill_mask", dict(text="The [MASK] is here.", top_k=50), "greater than maximum value 20"),
    ("public", "/pseudo_log_likelihood", dict(text="word " * 400), "the text's length in characters is 2,000"),
    # models
    ("private", "/load", dict(source="  ", dtype="auto"), "type a model to load"),
    ("private", "/load", dict(source="/no/such/model", dtype="auto"), "no model at"),
    ("public", "/load", dict(source="/etc/passwd", dtype="auto"), "paths on the server are not available"),
    ("public", "/load", dict(source="/no/such/model", dtype="auto"), "paths on the server are not available"),
    ("private", "/export", dict(precision="fp8"), "is not in the list of choices: ['fp32', 'int8', 'int4']"),
    # training
    ("private", "/finetune", FORM, "choose training data"),
    ("private", "/finetune", {**FORM, "data_path": "/no/such/data.txt", "steps": None}, "steps must be a whole number"),
    ("public", "/finetune", {**FORM, "data_path": "/etc/hostname"}, "upload only"),
    ("public", "/finetune", {**FORM, "data_path": "/etc/hostname", "steps": 10**9}, "steps is 1,000,000,000"),
    ("public", "/cancel_finetune", {}, "no training job of yours to cancel"),
    ("private", "/compare_classifiers", {}, "first finish a classification run"),
    # scoring
    ("private", "/evaluate", dict(upload=None, sample="prose (perplexity, agreement)", metrics=["perplexity"],
                                  runner_name="eager", against=None, max_length=32, stride=64, max_new_tokens=8,
                                  temperature=0), "stride 64 > max_length 32"),
    # kernel lab
    ("public", "/kernel_check", dict(op="layer_norm", shape="64, 4096", dtype="float32"), "the cap here is 40,000"),
    ("private", "/kernel_check", dict(op="attention", shape="1, 4, 3, 8, 16", dtype="float32"),
     "key/value heads must divide"),
]


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny("llama", tiny)
    current.load(str(tiny))
    mp = pytest.MonkeyPatch()
    mp.setenv("FORNAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    found = {}
    try:
        for mode in ("private", "public"):
            mp.setenv("FORNAX_PUBLIC", "1" if mode == "public" else "0")
            found[mode] = serving(build_app())
        urls = {mode: server.__enter__() for mode, server in found.items()}
        yield mp, {mode: gradio_client.Client(url, verbose=False) for mode, url in urls.items()}
    finally:
        for server in found.values():
            server.__exit__(None, None, None)
        mp.undo()


@pytest.mark.parametrize("mode, api_name, arguments, words", CATALOGUE,
                         ids=[f"{m}{a}-{w[:30]}" for m, a, _, w in CATALOGUE])
def test_bad_input_is_a_plain_message_and_the_app_keeps_serving(clients, mode, api_name, arguments, words):
    mp, by_mode = clients
    mp.setenv("FORNAX_PUBLIC", "1" if mode == "public" else "0")  # the mode the handlers read per request
    client = by_mode[mode]
    with pytest.raises(AppError) as e:
        client.predict(**arguments, api_name=api_name)
    message = str(e.value)
    assert words in message, message
    assert "Traceback" not in message and 'File "' not in message and "something went wrong" not in message
    text, _, stats = client.predict(prompt="The", **{**PANEL, "max_new_tokens": 3}, api_name="/complete")
    assert "tok/s" in stats
