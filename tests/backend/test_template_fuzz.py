"""A hypothesis fuzz of the chat-template renderer (issue 18): random templates from a grammar of filters, methods,
globals and operators over literal arguments (strings, big numbers, lists, the messages). In public mode every render
either returns at most the output cap or raises a FornaxError (TemplateLimitError, or the plain error a jinja
TemplateError becomes), within a time bound and with the process's peak RSS growing by at most 200 MB.

`test_template_fuzz_ci` runs a bounded, derandomized number of examples in the normal suite; `test_template_fuzz_long`
runs FORNAX_FUZZ_EXAMPLES (default 2000) random ones under the `fuzz` marker (`pytest -m fuzz`)."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import jinja2.sandbox
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from backend import limits
from backend.errors import FornaxError
from backend.formats.tokenizer import Tokenizer
from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset

CI_EXAMPLES = 60
LONG_EXAMPLES = int(os.environ.get("FORNAX_FUZZ_EXAMPLES", "2000"))
TEMPLATE_TIME_S = 0.5          # the deadline under test (public's 2 s, shortened to keep the run short)
TIME_BOUND_S = 5.0             # per render: the deadline plus what one sized operation may take past it
MEMORY_BOUND = 200 * 1024**2

FILTERS = sorted(jinja2.sandbox.ImmutableSandboxedEnvironment().filters)  # allowed and refused ones alike
METHODS = ["replace", "format", "join", "center", "ljust", "zfill", "expandtabs", "split", "strip", "upper",
           "startswith", "translate", "encode", "format_map", "get", "items", "count", "index", "title"]
GLOBALS = ["range", "lipsum", "dict", "namespace", "cycler", "joiner", "strftime_now", "raise_exception"]
OPERATORS = ["+", "*", "%", "~", "**", "//", "==", " in "]
NUMBERS = [0, 1, 2, 7, 80, 4096, 10**5, 2 * 10**5 + 1, 10**6, 10**9, 10**12, 2**63, -1]
STRINGS = ["''", "'x'", "'%s'", "'{}'", "'{0}{0}{0}'", "'\\t'", "'a\\nb'", "'&<>'", "'%1000000Y'", "'{:>99999}'",
           "big", "messages[0]['content']"]

literal = st.one_of(st.sampled_from(STRINGS), st.sampled_from(NUMBERS).map(str),
                    st.sampled_from(["[1, 2]", "['a', big]", "messages", "{'a': big}", "range(1000)", "none",
                                     "nothing", "ns", "namespace(a=big, b=big)", "loop"]))


def extend(inner):
    args = st.lists(st.one_of(literal, inner), max_size=3).map(", ".join)
    return st.one_of(
        st.tuples(inner, st.sampled_from(FILTERS), args).map(lambda t: f"({t[0]})|{t[1]}({t[2]})"),
        st.tuples(inner, st.sampled_from(METHODS), args).map(lambda t: f"({t[0]}).{t[1]}({t[2]})"),
        st.tuples(st.sampled_from(GLOBALS), args).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(inner, st.sampled_from(OPERATORS), inner).map(lambda t: f"({t[0]}){t[1]}({t[2]})"),
        st.lists(inner, min_size=1, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
    )


expression = st.recursive(literal, extend, max_leaves=6)
statement = st.one_of(
    expression.map(lambda e: "{{ %s }}" % e),
    st.tuples(expression, expression).map(lambda t: "{%% for i in %s %%}{{ %s }}{%% endfor %%}" % t),
    expression.map(lambda e: "{%% for i in range(100) %%}{%% set ns.v = %s %%}{%% endfor %%}{{ ns.v }}" % e),
    expression.map(lambda e: "{%% set x %%}{%% for i in range(1000) %%}{{ %s }}{%% endfor %%}{%% endset %%}"
                             "{{ x|length }}" % e),
)
template = st.lists(statement, min_size=1, max_size=3).map(
    lambda parts: "{% set big = 'y' * 100000 %}{% set ns = namespace(v=1) %}" + "".join(parts))


@pytest.fixture(autouse=True)
def public_caps(monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_TEMPLATE_TIME_S", str(TEMPLATE_TIME_S))
    monkeypatch.delenv("FORNAX_MAX_TEMPLATE_OUTPUT_CHARS", raising=False)


def render_is_bounded(source: str):
    tk = Tokenizer(HFTokenizer(models.BPE()), chat_template=source)
    measured = peak_rss_reset()
    before, start = peak_rss_bytes(), time.monotonic()
    try:
        out = tk.render_chat([{"role": "user", "content": "hi"}])
    except FornaxError:
        out = ""
    took, grew = time.monotonic() - start, peak_rss_bytes() - before
    assert len(out) <= limits.current().max_template_output_chars
    assert took < TIME_BOUND_S, f"rendering took {took:.1f} s"
    if measured:
        assert grew < MEMORY_BOUND, f"peak RSS grew by {grew / 1e6:.0f} MB"


def fuzz(n: int, ci: bool):
    return settings(max_examples=n, deadline=timedelta(seconds=TIME_BOUND_S * 2), derandomize=ci, database=None,
                    suppress_health_check=list(HealthCheck))(given(template)(render_is_bounded))


test_template_fuzz_ci = fuzz(CI_EXAMPLES, ci=True)
test_template_fuzz_long = pytest.mark.fuzz(fuzz(LONG_EXAMPLES, ci=False))
