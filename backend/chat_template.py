"""Chat templates from model files, rendered with an output-length cap and a deadline.

jinja2's sandbox stops a template from reaching Python internals, but not from spending memory or time: its
`range` is capped at 100 000 items, yet `{{ 'x' * 10**10 }}` builds a 10 GB string and three nested loops run
10^15 times. Here
- operators that make big values (`*`, `**`, `+`, `%`) are checked before they run (jinja's intercepted binops),
  and so are calls and filters that take a size (`'x'.ljust(n)`, `|center(n)`, `|indent(n)`, `.replace`, `.join`);
- every block body the compiler emits (each loop iteration, each `if`, each macro call) starts with a tick that
  checks the deadline, so a loop that prints nothing still stops;
- the output is produced chunk by chunk and counted.
Any of them raises TemplateLimitError (a GenerationError) that says which limit the template hit.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import limits
from .errors import GenerationError

_state = threading.local()   # per rendering thread: deadline and output cap
_WIDTH = re.compile(r"\d+")  # numbers inside a format spec (widths, precisions)


class TemplateLimitError(GenerationError):
    """A chat template tried to make too much output or ran too long."""


def _cap() -> int:
    return getattr(_state, "cap", None) or limits.current().max_template_output_chars


def _too_big(n: float, what: str):
    if n > _cap():
        raise TemplateLimitError(f"the chat template tried to build {what} of {n:,.0f} characters or items "
                                 f"(at most {_cap():,} allowed)")


def _tick():
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"the chat template ran longer than {_state.seconds:g} s (a loop that does not end?)")


def _size(v) -> int | None:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else None


class _TickingCodeGenerator(CodeGenerator):
    """Writes `environment.tick()` where jinja writes the `pass` that opens every block body."""

    def blockvisit(self, nodes, frame):
        try:
            self.writeline("environment.tick()")
            for node in nodes:
                self.visit(node, frame)
        except jinja2.compiler.CompilerExit:
            pass

    def visit_Concat(self, node, frame):  # `a ~ b`: joined by environment.concat_checked, which sizes it first
        self.write("environment.concat_checked((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _TickingCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    @staticmethod
    def tick():
        _tick()

    @staticmethod
    def concat_checked(parts) -> str:
        parts = [str(p) for p in parts]
        _too_big(sum(map(len, parts)), "a `~` concatenation")
        return "".join(parts)

    def call_binop(self, context, op, left, right):
        _tick()
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int):
                    _too_big(_size(seq) * n, "a repeated string or list")
        elif op == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 4096:
                raise TemplateLimitError(f"the chat template computes {left!r} ** {right!r}, a number over 4096 bits")
        elif op == "+" and _size(left) is not None and _size(right) is not None:
            _too_big(_size(left) + _size(right), "a concatenation")
        elif op == "%" and isinstance(left, str):
            _check_format_spec(left)
        return super().call_binop(context, op, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's own signature
        _tick()
        _check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in (
                "format", "format_map"):
            _check_format_spec(value.__self__)  # at attribute access, before the wrapped method can be called
        return super().wrap_str_format(value)


def _check_format_spec(fmt: str):
    for m in _WIDTH.finditer(fmt):
        if len(m.group()) > 7 or int(m.group()) > _cap():
            _too_big(float(m.group()) if len(m.group()) < 300 else float("inf"), "a formatted field")


def _check_call(obj, args, kwargs):
    """Sizes a call will build: any integer argument is a width or a count; replace/join multiply lengths."""
    values = list(args) + list(kwargs.values())
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            _too_big(v, "a value sized by an argument")
    name = getattr(obj, "__name__", "")
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, str):
        if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
            _too_big(len(owner) * (len(args[1]) + 1) + len(args[1]), "a replaced string")
        elif name == "join" and args and _size(args[0]) is not None:
            items = args[0]
            _too_big(sum(len(x) if isinstance(x, str) else 1 for x in items) + len(owner) * len(items), "a join")
        elif name in ("format", "format_map"):
            _check_format_spec(owner)


def _bounded_filter(f):
    """Wrap a built-in filter so that integer arguments (widths, counts) are capped before it runs."""
    def wrapper(*args, **kwargs):
        _tick()
        for v in list(args[1:]) + list(kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool):
                _too_big(v, "a filter's width or count")
        if f.__name__ in ("do_join", "sync_do_join") and len(args) > 1 and _size(args[1]) is not None:
            seq = args[1]
            sep = args[2] if len(args) > 2 and isinstance(args[2], str) else kwargs.get("d", "")
            _too_big(sum(len(x) if isinstance(x, str) else 1 for x in seq) + len(sep) * len(seq), "a join")
        return f(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep pass_context / pass_environment / pass_eval_context markers
        if hasattr(f, attr):
            setattr(wrapper, attr, getattr(f, attr))
    wrapper.__name__ = getattr(f, "__name__", "filter")
    return wrapper


def _range(*args):
    """The sandbox's range (at most 100 000 items), with the deadline checked as it is iterated."""
    from jinja2.sandbox import safe_range

    for i in safe_range(*args):
        _tick()
        yield i


def make_environment() -> BoundedEnvironment:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int):
            _too_big(indent, "a JSON indent")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _range
    return env


def render(template: jinja2.Template, **context) -> str:
    """Render with the caps of `backend.limits` (output characters, seconds); TemplateLimitError past either."""
    caps = limits.current()
    _state.cap, _state.seconds = caps.max_template_output_chars, caps.template_time_s
    _state.deadline = time.monotonic() + caps.template_time_s
    out, n = [], 0
    try:
        for chunk in template.generate(**context):
            n += len(chunk)
            if n > caps.max_template_output_chars:
                raise TemplateLimitError(f"the chat template's output passed {caps.max_template_output_chars:,} "
                                         f"characters")
            _tick()
            out.append(chunk)
    except (MemoryError, OverflowError, RecursionError) as e:
        raise TemplateLimitError(f"the chat template ran out of room: {type(e).__name__}") from e
    finally:
        _state.deadline = _state.cap = None
    return "".join(out)

