"""What the pages show, without a model or a browser: token colouring, tooltips, escaping, message plumbing."""
import math
import re

from backend import Completion, GenerationResult, Timings, TokenInfo
from playground import render
from playground.tabs.chat import model_messages, reply_messages
from playground.tabs.params import parse_stop, sampling_kwargs


def token(id, text, p, top=()):
    return TokenInfo(id, text, math.log(p), [(i, t, math.log(q)) for i, t, q in top])


def result(*completions):
    timings = Timings(prompt_tokens=3, new_tokens=4, ttft_s=0.05, prefill_s=0.04, decode_s=0.2, decode_steps=5,
                      weight_bytes=2_000_000_000)
    return GenerationResult(list(completions), [1, 2, 3], timings, seed=42)


def test_tokens_are_coloured_by_probability_and_escaped():
    tokens = [token(5, " <b>bold", 0.9, [(5, " <b>bold", 0.9), (6, " plain", 0.05)]),
              token(7, "\n", 0.02, [(8, ".", 0.6), (9, "!", 0.3)])]  # sampled from outside its top-2
    html = render.token_view("Say <i>", result(Completion(" <b>bold\n", [5, 7], tokens, "length")))
    assert "<b>" not in html and "<i>" not in html and "&lt;b&gt;bold" in html and "Say &lt;i&gt;" in html
    spans = re.findall(r"<span class='fx-tok' tabindex='0' style='background:hsla\((\d+), 85%, 50%, ([\d.]+)\)'>",
                       html)
    assert len(spans) == 2
    (likely_hue, likely_alpha), (unlikely_hue, unlikely_alpha) = spans
    assert int(likely_hue) > 100 > 10 > int(unlikely_hue) and float(likely_alpha) < float(unlikely_alpha)
    tips = re.findall(r"<span class='fx-tip' role='tooltip'>(.*?)</span></span>"
                      r"(?=<span class='fx-tok|<span class='fx-f)", html)
    assert len(tips) == 2
    assert "fx-alt fx-chosen'><code>␣&lt;b&gt;bold</code>" in tips[0] and "␣plain" in tips[0] and "90.0%" in tips[0]
    # The newline was sampled outside the top-2: still listed, as the chosen row, with its own probability.
    assert tips[1].count("fx-alt") == 3 and "fx-chosen'><code>↵</code>" in tips[1] and "2.0%" in tips[1]
    assert "↵\n" in html  # a newline token shows as ↵ and still breaks the line
    assert "perplexity" in html and "length" in html


def test_tokens_that_spelled_a_stop_string_are_struck_through():
    tokens = [token(1, "Hi", 0.5), token(2, " there", 0.5), token(3, "\n", 0.5), token(4, "User", 0.5)]
    html = render.token_view("", result(Completion("Hi there", [1, 2, 3, 4], tokens, "stop")))
    assert html.count("class='fx-tok'") == 2 and html.count("class='fx-tok fx-cut'") == 2


def test_samples_each_get_a_view():
    one = Completion("a", [1], [token(1, "a", 0.5)], "eos")
    html = render.token_view("x", result(one, one))
    assert html.count("fx-sample-head") == 2


def test_stats_line_shows_ttft_speed_bandwidth_and_seed():
    line = render.stats_line(result(Completion("a", [1], [token(1, "a", 0.5)], "eos")), "eager")
    assert "TTFT **50 ms**" in line and "**25.0 tok/s**" in line and "**50.0 GB/s**" in line and "seed 42" in line


def test_percent_and_sizes_read_well():
    assert render.percent(math.log(0.5)) == "50.0%"
    assert render.percent(math.log(0.0004)) == "0.04%"
    assert render.percent(math.log(1e-9)) == "<0.01%"
    assert render.human_count(134_515_008) == "134.5M" and render.human_count(1_000_000_000) == "1B"
    assert render.human_bytes(538_060_032) == "538.1 MB"


def test_model_card_lists_what_was_loaded():
    info = dict(source="default", name="Tiny <model>", family="llama", model_type="llama", parameters=135_000_000,
                layers=30, heads=9, kv_heads=3, d_model=576, vocab_size=49152, context_length=8192,
                dtype="float32", device="cpu", weight_bytes=538_000_000, load_seconds=0.52, chat_template="model",
                runners=["eager", "onnx"])
    card = render.model_card(info)
    for fact in ("Tiny &lt;model&gt;", "135M", "9 / 3", "8,192", "538.0 MB", "0.52 s", "eager, onnx", "float32"):
        assert fact in card
    assert "No model loaded" in render.model_card(None)


def test_stop_strings_take_escapes():
    assert parse_stop(["\\n\\n", "User:", ""]) == ["\n\n", "User:"]
    assert parse_stop(None) == [] and parse_stop("###") == ["###"]


def test_panel_seed_minus_one_means_random():
    panel = dict(max_new_tokens=8, temperature=0.7, top_k=0, top_p=1, min_p=0, repetition_penalty=1,
                 presence_penalty=0, frequency_penalty=0, stop=[], num_samples=1)
    assert sampling_kwargs(**panel, seed=-1)["seed"] is None
    assert sampling_kwargs(**panel, seed=None)["seed"] is None
    assert sampling_kwargs(**panel, seed=7)["seed"] == 7


def test_chat_history_becomes_model_messages():
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               *reply_messages(["Hello", "Hey"]),
               {"role": "user", "content": "Bye", "metadata": None}]
    assert model_messages(history, "  ") == [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"},
                                             {"role": "user", "content": "Bye"}]
    assert model_messages(history[:1], "Be brief.")[0] == {"role": "system", "content": "Be brief."}
