"""Fuzzing the parsers we own with hypothesis: the GGUF pre-check and conversion, config loading, safetensors
headers, the training data readers and chat-template rendering. Each must either succeed or raise a FornaxError;
any other exception (or a hang past the deadline) is a crash hypothesis shrinks and reports.

Each target runs twice: `_ci` with a few dozen derandomized examples (seconds, in CI) and `_long` with
FORNAX_FUZZ_EXAMPLES (default 2000) random ones, marked `fuzz` and deselected unless run as `pytest -m fuzz`.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.errors import FornaxError
from tests.backend import bad_files as bf

LONG_EXAMPLES = int(os.environ.get("FORNAX_FUZZ_EXAMPLES", "2000"))
EXTREMES = [0, 1, 2, 3, 7, 8, 9, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]


def fuzz_target(name: str, strategy, ci_examples: int):
    """Register test_fuzz_<name>_ci and test_fuzz_<name>_long for a check(example) function."""
    def register(check):
        for mode, n in (("ci", ci_examples), ("long", LONG_EXAMPLES)):
            test = settings(max_examples=n, deadline=timedelta(seconds=20), derandomize=mode == "ci",
                            database=None, suppress_health_check=list(HealthCheck))(given(strategy)(check))
            if mode == "long":
                test = pytest.mark.fuzz(test)
            test.__name__ = f"test_fuzz_{name}_{mode}"
            globals()[test.__name__] = test
        return check
    return register


@pytest.fixture(scope="module", autouse=True)
def _warm_up():
    """One conversion before any example is timed: the first pays for imports, not for its input."""
    check_gguf_mutation(([], [], None))


def refused_or_fine(call):
    try:
        call()
    except FornaxError:
        pass


# --- GGUF: mutations of a valid tiny file, through the pre-check, gguf's reader and the conversion ---
@lru_cache(maxsize=1)
def tiny_gguf_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return bf.tiny_gguf(Path(d) / "t.gguf").read_bytes()


@lru_cache(maxsize=1)
def metadata_end() -> int:
    """Where the tiny file's tensor data starts: mutations aim before it."""
    from backend.formats.gguf_check import check_gguf

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.gguf"
        p.write_bytes(tiny_gguf_bytes())
        return check_gguf(p).metadata_bytes


gguf_mutation = st.tuples(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),                # byte flips (position ratio)
    st.lists(st.tuples(st.floats(0, 1), st.sampled_from(EXTREMES), st.sampled_from(["<I", "<Q"])), max_size=3),
    st.one_of(st.none(), st.floats(0, 1)),                                                 # truncation point
)


@fuzz_target("gguf_conversion", gguf_mutation, ci_examples=30)
def check_gguf_mutation(mutation):
    from backend.formats.gguf import convert_gguf

    flips, ints, cut = mutation
    data = bytearray(tiny_gguf_bytes())
    end = metadata_end()  # aim at the metadata and tensor table, where the parser lives
    for where, value in flips:
        data[int(where * (end - 1))] = value
    for where, value, fmt in ints:
        pos = int(where * (end - 8))
        data[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value % (2**32 if fmt == "<I" else 2**64))
    if cut is not None:
        data = data[:int(cut * len(data))]
    with tempfile.TemporaryDirectory() as d:
        os.environ["FORNAX_CACHE"] = str(Path(d) / "cache")
        try:
            p = Path(d) / "m.gguf"
            p.write_bytes(bytes(data))
            refused_or_fine(lambda: convert_gguf(p))
        finally:
            os.environ.pop("FORNAX_CACHE", None)


@fuzz_target("gguf_precheck_random", st.binary(max_size=600), ci_examples=150)
def check_gguf_random(tail):
    from backend.formats.gguf_check import check_gguf

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.gguf"
        p.write_bytes(b"GGUF" + struct.pack("<I", 3) + tail)
        refused_or_fine(lambda: check_gguf(p))


# --- config.json ---
json_value = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(EXTREMES),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(-3, 3), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
config_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "eos_token_id", "n_layer", "n_head", "n_embd", "n_positions",
               "n_inner", "layer_norm_epsilon", "_name_or_path", "sliding_window", "attention_bias"]
config_dict = st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "gpt2", "qwen2", "mistral", "bert", 3])},
                                    optional={k: json_value for k in config_keys})


@fuzz_target("config", config_dict, ci_examples=150)
def check_config(cfg):
    from backend.loading import read_hf_folder

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        refused_or_fine(lambda: read_hf_folder(Path(d)))  # no weights: a config that passes is refused after


# --- safetensors headers ---
safetensors_header = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, body: struct.pack("<Q", n) + body, st.sampled_from(EXTREMES), st.binary(max_size=64)),
    st.builds(lambda header, pad: (lambda h: struct.pack("<Q", len(h)) + h + bytes(pad))(json.dumps(header).encode()),
              st.dictionaries(st.sampled_from(["model.norm.weight", "__metadata__", "x"]), st.fixed_dictionaries({
                  "dtype": st.sampled_from(["F32", "F16", "I64", "XX", 3]),
                  "shape": st.lists(st.sampled_from(EXTREMES), max_size=3),
                  "data_offsets": st.lists(st.sampled_from(EXTREMES), min_size=0, max_size=3)}), max_size=2),
              st.integers(0, 64)),
)


@fuzz_target("safetensors", safetensors_header, ci_examples=100)
def check_safetensors(data):
    from backend.loading import read_weights

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(data)
        refused_or_fine(lambda: read_weights(Path(d)))


# --- training data readers ---
data_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.lists(st.one_of(st.just('{"text": "a", "label": "b"}'), st.just('{"messages": []}'), st.just("text,label"),
                       st.just('{"text": 1}'), st.text(max_size=20)), max_size=6
             ).map(lambda lines: "\n".join(lines).encode()),
)


@fuzz_target("data_readers", st.tuples(st.sampled_from([".txt", ".jsonl", ".csv", ".json", ""]), data_bytes,
                                       st.sampled_from(["auto", "lm", "chat", "classify"])), ci_examples=150)
def check_data(example):
    from backend.data.records import read_records

    suffix, raw, task = example
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data{suffix}"
        p.write_bytes(raw)
        refused_or_fine(lambda: read_records(p, task))


# --- chat templates: snippets of jinja put together at random ---
SNIPPETS = ["{{ messages[0]['content'] }}", "{% for m in messages %}", "{% endfor %}", "{% if x %}", "{% endif %}",
            "{{ 'x' * 9999999 }}", "{{ 10 ** 100000 }}", "{% for i in range(100000) %}", "{{ loop.index }}",
            "{{ messages|tojson }}", "{{ m.role|upper }}", "{{ raise_exception('no') }}", "{{ 1 / 0 }}",
            "{{ 'a' ~ 'b' }}", "{{ x.__class__ }}", "{{ ''.join(['a'] * 5) }}", "{% set ns = namespace(v='a') %}",
            "{% set ns.v = ns.v ~ ns.v %}", "{{ ns.v|length }}", "{{ '%s'|format(1) }}", "{{ [1,2][5] }}",
            "{{ 'x'|center(99999999) }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "text", "{{", "}}"]


@fuzz_target("chat_template", st.lists(st.sampled_from(SNIPPETS), max_size=8).map("".join), ci_examples=150)
def check_template(source):
    from backend.formats.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    os.environ["FORNAX_TEMPLATE_TIME_S"] = "0.5"
    try:
        tk = Tokenizer(HFTokenizer(models.BPE()), chat_template=source)
        refused_or_fine(lambda: tk.render_chat([{"role": "user", "content": "hi"}]))
    finally:
        os.environ.pop("FORNAX_TEMPLATE_TIME_S", None)
