"""Chat-template bombs (issue 18, item 1): string-taking filters and methods, iteration-heavy builtins, output
captured by macros and set blocks. In public mode each is refused with a TemplateLimitError that names the limit,
within a few seconds and without the process's peak RSS growing past 200 MB; a real template still renders the way
jinja's plain sandbox (what transformers uses) renders it."""
from __future__ import annotations

import json
import time
from datetime import datetime

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from backend.formats.chat_template import TemplateLimitError
from backend.formats.tokenizer import Tokenizer
from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset

MEMORY_BOUND = 200 * 1024**2
TIME_BOUND_S = 5.0
BIG = "{% set big = 'x' * 150000 %}"  # within the public cap (200 000 characters) on its own

BOMBS = {
    # the ones the issue lists
    "replace-empty": (BIG + "{{ big|replace('', big) }}", "max_template_output_chars"),
    "replace-with-a-list": (BIG + "{{ ('x' * 1000)|replace(nothing, [big]) }}", "max_template_output_chars"),
    "format-filter": (BIG + "{{ '%s%s%s'|format(big, big, big) }}", "max_template_output_chars"),
    "indent-with-a-string": (BIG + "{{ ('a\\n' * 50000)|indent(big) }}", "max_template_output_chars"),
    "wordwrap-wrapstring": (BIG + "{{ ('a ' * 90000)|wordwrap(1, wrapstring=big) }}", "max_template_output_chars"),
    "expandtabs": ("{{ ('\\t' * 100000).expandtabs(100000) }}", "max_template_output_chars"),
    "many-field-format": (BIG + "{{ ('{0}' * 60000).format(big) }}", "max_template_output_chars"),
    "sum-start-list": ("{{ ([[1] * 1000] * 1000)|sum(start=[]) }}", "max_template_output_chars"),
    "sum-of-lists": ("{{ range(100000)|batch(1)|sum(start=[]) }}",  # quadratic: whichever comes first
                     "max_template_output_chars|template_time_s"),
    "lipsum": ("{{ lipsum(100000) }}", "may not use"),
    # more of the same kind
    "list-printed": (BIG + "{{ [big] * 100000 }}", "max_template_output_chars"),
    "upper-of-a-namespace": (BIG + "{{ namespace(a=big, b=big)|upper }}", "max_template_output_chars"),
    "dict-of-bigs": (BIG + "{{ dict(a=big, b=big)|length }}", "max_template_output_chars"),
    "map-kept-in-a-list": (BIG + "{{ range(100000)|map('string')|map('replace', '0', big)|list|length }}",
                           "max_template_output_chars"),
    "str-join-of-a-generator": (BIG + "{{ ''.join(range(100000)|map('string')|map('replace', '0', big)) }}",
                                "max_template_output_chars"),
    "set-block-capture": (BIG + "{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset %}"
                          "{{ x|length }}", "max_template_output_chars"),
    "macro-capture": (BIG + "{% macro m() %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endmacro %}"
                      "{{ m()|length }}", "max_template_output_chars"),
    "template-text-in-a-loop": ("{% set x %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endset %}",
                                "max_template_output_chars"),
    "int-squaring": ("{% set ns = namespace(x=2) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
                     "4096 bits"),
    "tower-of-references": ("{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(80) %}"
                            "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
                            "max_template_output_chars"),
    "tojson-indent-string": ("{{ [[[[1]]]]|tojson(indent='x' * 100000) }}", "max_template_output_chars"),
    "tojson-separators": (BIG + "{{ range(1000)|list|tojson(separators=(big, ':')) }}", "max_template_output_chars"),
    "percent-operator": (BIG + "{{ '%s%s%s' % (big, big, big) }}", "max_template_output_chars"),
    "escape-expands": ("{{ ('&' * 150000)|e }}", "max_template_output_chars"),
    "strftime-width": ("{{ strftime_now('%150000Y' * 1000) }}", "max_template_output_chars"),
    "str-translate": ("{{ 'aaaa'.translate({97: 'x' * 100000}) }}", "may not use"),
    "pprint": ("{{ range(10)|list|pprint }}", "may not use"),
    # `*` widths and precisions come from the arguments: each one, and all of them together, sized before formatting
    "percent-star-width": ("{{ '%*s' % (1000000000, '') }}", "max_template_output_chars"),
    "percent-star-precision": ("{{ '%.*f' % (1000000000, 1.0) }}", "max_template_output_chars"),
    "percent-star-widths-summed": ("{{ ('%*s' * 2000) % ((190000, '') * 2000) }}", "max_template_output_chars"),
    "percent-precisions-summed": ("{{ ('%.*f' * 100) % ((190000, 1e308) * 100) }}", "max_template_output_chars"),
    "percent-keyed-widths-summed": ("{{ ('%(a)190000s' * 100) % {'a': ''} }}", "max_template_output_chars"),
    "format-filter-star-widths": ("{{ ('%*s' * 2000)|format(*((190000, '') * 2000)) }}", "max_template_output_chars"),
    "str-format-nested-width-text": ("{{ '{:{}}'.format('', '>1000000000') }}", "max_template_output_chars"),
    "str-format-nested-widths-summed": ("{{ ('{:{}}' * 2000).format(*(('', 190000) * 2000)) }}",
                                        "max_template_output_chars"),
    "loop-that-never-ends": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                             "template_time_s"),
}


@pytest.fixture
def public(monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    for name in ("FORNAX_MAX_TEMPLATE_OUTPUT_CHARS", "FORNAX_TEMPLATE_TIME_S"):
        monkeypatch.delenv(name, raising=False)


def tokenizer(source: str) -> Tokenizer:
    return Tokenizer(HFTokenizer(models.BPE()), chat_template=source)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_refused_in_bounded_time_and_memory(public, name):
    source, limit = BOMBS[name]
    tk = tokenizer(source)
    measured = peak_rss_reset()
    before, start = peak_rss_bytes(), time.monotonic()
    with pytest.raises(TemplateLimitError) as refused:
        tk.render_chat(HI)
    took, grew = time.monotonic() - start, peak_rss_bytes() - before
    assert any(part in str(refused.value) for part in limit.split("|")), refused.value
    assert took < TIME_BOUND_S, f"{name}: refusing it took {took:.1f} s"
    if measured:
        assert grew < MEMORY_BOUND, f"{name}: peak RSS grew by {grew / 1e6:.0f} MB refusing it"
    assert tokenizer("{{ messages[0]['content'] }}").render_chat(HI) == "hi"  # and the next render works


def reference_render(source: str, **context) -> str:
    """jinja's plain immutable sandbox, set up as transformers sets it up."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source).render(**context)


# What real chat templates (Llama 3.x, Qwen2, ChatML / SmolLM, Mistral, Gemma, Phi, DeepSeek, GLM, Command-R) do:
# namespaces, macros whose result is used as a string, selectattr / map / join / tojson(indent), list
# concatenation in a loop, `.get`, `.items()` with a loop filter, slicing, split / strip chains, `break`, %-format.
KITCHEN_SINK = """
{%- set today = strftime_now("%Y-%m-%d") %}
{%- macro visible(content) -%}
    {%- if content is string -%}{{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}{%- if item is mapping and item.type == 'text' -%}{{- item.text }}{%- endif -%}
        {%- endfor -%}
    {%- else -%}{{- content }}{%- endif -%}
{%- endmacro -%}
{{- bos_token }}
{%- set ns = namespace(last_user=-1, seen=[], sys='') %}
{%- for m in messages %}{%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{%- endfor %}
{%- if messages and messages[0]['role']|lower == 'system' %}{% set ns.sys = messages[0]['content']|trim %}
{%- set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}
{{- '<|system|>' + ns.sys + '\\nToday: ' + today + '<|end|>\\n' if ns.sys else '' }}
{%- if tools is not none %}{% for t in tools %}{{ t | tojson(indent=4) }}{{ t | tojson(ensure_ascii=False) }}
{%- endfor %}{% endif %}
{%- set users = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set filtered = [] %}
{%- for message in loop_messages %}{%- if message["role"] not in ["tool"] and not message.get("tool_calls") %}
{%- set filtered = filtered + [message] %}{%- endif %}{%- endfor %}
{%- for message in filtered %}{%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
{{- raise_exception("roles must alternate user/assistant") }}{%- endif %}{%- endfor %}
{%- for m in loop_messages %}
  {%- set content = visible(m.content) %}
  {%- if m.role == 'assistant' and '</think>' in content %}
    {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
    {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
  {%- endif %}
  {{- '<|' + m['role'] + '|>' + content.strip() | replace('\\r\\n', '\\n') }}
  {%- if m == users[-1] %}{{ ' (last of ' ~ users|length ~ ' users)' }}{% endif %}
  {%- set _args = m.extra or {} %}
  {%- for k, v in _args.items() if k != 'skip' %}{{ k|upper }}={{ v|tojson if v is not string else v }}
  {%- if not loop.last %}, {% endif %}{% endfor %}
  {%- for msg in loop_messages[loop.index0 + 1:] %}{%- if msg.role == 'tool' %}
  {%- set ns.seen = ns.seen + [msg.content|string] %}{% else %}{% break %}{% endif %}{%- endfor %}
  {{- '<|end|>\\n' }}
{%- endfor %}
{{- ns.seen|join(', ') }}{{ (messages|map(attribute='role')|join('/'))|title }} {{ messages|length }}
{{- (messages|map(attribute='content')|map('length')|sum) }}
{{- '%s-%d'|format('x', 3) }} {{ '{}:{}'.format('a', 1) }} {{ 'abc'|center(9) }}|{{ 'a\\nb'|indent(2) }}|
{{- "%-5s|" % 'ab' }}{{ range(3)|list }}{{ (messages|first).role }}{{ (messages|last).role|capitalize }}
{%- if False %}{{ lipsum(3) }}{{ x|pprint }}{% endif %}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}
"""
MESSAGES = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hi <b>&"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\nhello.", "extra": {"a": 1, "b": "x", "skip": 0}},
            {"role": "tool", "content": "42"}, {"role": "user", "content": [{"type": "text", "text": "more"}]}]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "description": "a query, \"quoted\" é"}}}}}]


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_real_template_constructs_render_as_jinja_renders_them(public, tools):
    from backend.formats import chat_template

    context = dict(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", tools=tools)
    want = reference_render(KITCHEN_SINK, **context)
    got = chat_template.render(chat_template.make_environment().from_string(KITCHEN_SINK), **context)
    assert got == want
    assert "A=1, B=x" in got and "(last of 2 users)" in got and "<|assistant|>" in got


def test_long_chat_within_the_caps_still_renders(public):
    """60 000 characters of chat (the public prompt cap) through ChatML, `|trim` and `tojson`: nothing refused."""
    source = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content']|trim }}<|im_end|>\n{% endfor %}"
              "{{ messages|tojson|length }}")
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 600} for i in range(20)]
    out = tokenizer(source).render_chat(chat)
    assert out.count("<|im_start|>") == 20


def test_template_source_is_capped(public):
    """Compiling runs outside the render deadline: jinja's parser spends seconds and 100+ MB on 190 000 characters."""
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match="max_template_source_chars"):
        tokenizer("{{ a.b.c.d.e.f.g }}" * 2700).render_chat(HI)  # 51 300 characters
    assert time.monotonic() - start < 0.5
    assert tokenizer("x" * 50_000).render_chat(HI) == "x" * 50_000


def test_template_source_cap_is_generous_in_private_mode(monkeypatch):
    monkeypatch.delenv("FORNAX_PUBLIC", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("FORNAX_MAX_TEMPLATE_SOURCE_CHARS", raising=False)
    assert tokenizer("x" * 60_000).render_chat(HI) == "x" * 60_000


def test_template_that_fails_to_compile_is_compiled_once(public, monkeypatch):
    """A template that fails at its end is remembered as failing: no parsing again on every chat or gauge call."""
    from backend.formats import chat_template
    from backend.errors import GenerationError

    compiled = []
    make = chat_template.make_environment
    monkeypatch.setattr(chat_template, "make_environment", lambda: compiled.append(1) or make())
    source = f"{{# {time.time_ns()} #}}" + "{{ a.b.c.d.e.f.g }}" * 2600 + "{% endfor %}"
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(GenerationError, match="does not parse"):
            tokenizer(source).render_chat(HI)
        assert time.monotonic() - start < TIME_BOUND_S
    assert len(compiled) == 1
