"""Chat templates from model files, rendered with an output-length cap and a deadline.

jinja2's sandbox stops a template from reaching Python internals, but not from spending memory or time: its
`range` is capped at 100 000 items, yet `{{ 'x' * 10**10 }}` builds a 10 GB string and three nested loops run
10^15 times. Here every operation that can make a value bigger than its inputs is sized *before* it runs, from all
of its arguments (strings as well as numbers), against `limits.max_template_output_chars`:
- a template may use only an allowlist of filters, globals and methods (what real chat templates use: Llama 3,
  Qwen2, ChatML / SmolLM, Mistral, Gemma, Phi); anything else is refused when called (`lipsum`, `pprint`,
  `str.translate`, ...), so a template that merely mentions one in a branch it never takes still renders;
- each allowed size-making operation has a sizer: `*`, `**`, `+`, `%`, `~`, `.format`, `|format`, `|replace`,
  `|indent`, `|center`, `|wordwrap`, `.expandtabs`, `|tojson`, `strftime_now`, ...; anything that turns a value
  into text (`{{ x }}`, `|string`, `|upper` of a list) measures the text first, by walking the value with early stop;
- list, tuple and dict literals are sized as they are built, so no value can be a tower of shared references whose
  text, comparison or hash is exponential;
- `join`, `sum`, `map`, `select`, ... and `range` check the deadline at every item, and every block body the
  compiler emits (each loop iteration, each `if`, each macro call) starts with a tick, so a loop that prints
  nothing still stops;
- every character any output statement writes is counted, captured ones (macros, `{% set %}` blocks) included.
Any of them raises TemplateLimitError (a GenerationError) that says which limit the template hit.
"""
from __future__ import annotations

import inspect
import json
import math
import re
import string
import threading
import time
import types
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.runtime
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from .. import limits
from ..errors import GenerationError

_state = threading.local()   # per rendering thread: deadline, output cap, characters written so far
_WIDTH = re.compile(r"\d+")  # numbers inside a format spec (widths, precisions)
WRITTEN_FACTOR = 8           # all output statements together (macros, set blocks) may write this many × the cap


class TemplateLimitError(GenerationError):
    """A chat template tried to make too much output, ran too long, or called something templates may not use."""


def _cap() -> int:
    return getattr(_state, "cap", None) or limits.current().max_template_output_chars


def _too_big(n: float, what: str):
    if n > _cap():
        raise TemplateLimitError(f"the chat template tried to build {what} of {min(n, 10**18):,.0f} characters or "
                                 f"items (at most {_cap():,} allowed: max_template_output_chars)")


def _tick():
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"the chat template ran longer than {_state.seconds:g} s (template_time_s; a loop "
                                 f"that does not end?)")


# --- measuring values without building their text -------------------------------------------------------------

def _children(value):
    """The parts of a container that its text (repr / JSON) shows, or None for a leaf."""
    if isinstance(value, dict):
        return [x for kv in value.items() for x in kv]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, (type({}.items()), type({}.keys()), type({}.values()))):
        return [x for item in value for x in (item if isinstance(item, tuple) else (item,))]
    if isinstance(value, jinja2.utils.Namespace):
        return [x for kv in object.__getattribute__(value, "_Namespace__attrs").items() for x in kv]
    return None


def _measure(value, limit: int, leaf, per_item: int = 4, per_depth: int = 0) -> int:
    """The length of `value`'s text, stopping at `limit + 1`: leaves cost `leaf(x)`, each contained item
    `per_item` (separators, quotes) plus `per_depth` × its depth (JSON indentation). Walked iteratively, each
    shared reference counted every time it is shown (as the text would), so a cycle or a tower of references
    stops at the limit instead of running away."""
    total, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        parts = _children(v)
        if parts is None:
            total += leaf(v)
        else:
            total += 2 + len(parts) * (per_item + per_depth * (depth + 1))
            if total <= limit:
                stack.extend((p, depth + 1) for p in parts)
        if total > limit:
            return limit + 1
    return total


def _leaf_repr_len(memo: dict):
    def leaf(v) -> int:
        if isinstance(v, bool) or v is None:
            return 5
        if isinstance(v, int):
            return v.bit_length() * 31 // 100 + 2  # digits, without building a number's text
        if isinstance(v, float):
            return 24
        key = id(v)
        if key not in memo:  # a string inside a container shows as its repr; one per distinct object
            memo[key] = len(repr(v)) if isinstance(v, str) else min(len(repr(v)), 200)
        return memo[key]
    return leaf


def text_len(value, limit: int | None = None) -> int:
    """Characters `str(value)` would have (up to `limit + 1`), without building it."""
    if isinstance(value, str):
        return len(value)
    limit = _cap() if limit is None else limit
    return _measure(value, limit, _leaf_repr_len({}))


def json_len(value, indent: int = 0, ensure_ascii: bool = False, separators=None, limit: int | None = None) -> int:
    """Characters json.dumps(value) would have (about, up to `limit + 1`), without building it."""
    memo: dict = {}

    def leaf(v) -> int:
        if isinstance(v, str):
            if id(v) not in memo:
                memo[id(v)] = len(json.dumps(v, ensure_ascii=bool(ensure_ascii)))
            return memo[id(v)]
        return _leaf_repr_len(memo)(v)

    limit = _cap() if limit is None else limit
    per_item = 4 + (1 if indent else 0)
    if isinstance(separators, (tuple, list)):  # (item separator, key separator), each as long as it likes
        per_item += sum(text_len(sep) for sep in separators)
    return _measure(value, limit, leaf, per_item=per_item, per_depth=indent)


def _check_text(value, what: str):
    if not isinstance(value, str):
        _too_big(text_len(value), what)


def _write(text: str) -> str:
    """Every piece any output statement writes passes here: captured output (macros, set blocks) counts too."""
    _state.written = getattr(_state, "written", 0) + len(text)
    if getattr(_state, "deadline", None) is not None and _state.written > WRITTEN_FACTOR * _cap():
        raise TemplateLimitError(f"the chat template wrote more than {WRITTEN_FACTOR * _cap():,} characters in all "
                                 f"(its output, macros and set blocks; max_template_output_chars × {WRITTEN_FACTOR})")
    return text


def _finalize(value):
    """Runs on the value of every `{{ ... }}` before it becomes text."""
    _check_text(value, "the text of a value")
    return value


# --- sizers for formatting ----------------------------------------------------------------------------------------

def _check_format_spec(fmt: str):
    for m in _WIDTH.finditer(fmt):
        if len(m.group()) > 7 or int(m.group()) > _cap():
            _too_big(float(m.group()) if len(m.group()) < 300 else float("inf"), "a formatted field")


def _widest(fmt: str) -> int:
    return max((int(m.group()) for m in _WIDTH.finditer(fmt)), default=0)


def _digits_of(value) -> int:
    """Characters of a number's integer part as `%d` / `%f` / `{:f}` show it (sign included), without building it;
    24 for anything else (its text is sized elsewhere)."""
    if isinstance(value, int):
        return value.bit_length() // 3 + 2  # octal has the most digits per bit; decimal and hex fewer
    if isinstance(value, float):
        if not math.isfinite(value):
            return 4
        return int(math.log10(abs(value))) + 3 if abs(value) >= 1 else 2
    return 24


def _field_len(value, kind: str, precision: int | None) -> int:
    """Characters one `%` conversion (or one `{}` field of type `kind`) shows for `value`, before its width:
    a string its text (truncated to the precision), a float its integer part plus the precision, and so on."""
    if kind in "sra":
        shown = text_len(value)
        if kind != "s":  # repr / ascii: each character at most 10 (`\U0001f600`), plus the quotes
            shown = 10 * shown + 2
        return shown if precision is None else min(shown, precision)
    if kind == "c":
        return 1
    if kind in "diuoxX" or kind == "n" and isinstance(value, int):
        return max(_digits_of(value), precision or 0) + 3  # sign, `0x` / `0o` prefix
    if kind in "fF%":
        return _digits_of(value) + (6 if precision is None else precision) + 6  # `%`: ×100, then the sign
    if kind in "eEgGn":
        return (6 if precision is None else precision) + 10  # sign, first digit, point, `e+308`
    if kind == "b":
        return (value.bit_length() if isinstance(value, int) else 0) + 3
    return text_len(value)


def _percent_number(fmt: str, at: int, take) -> tuple[int, int | None]:
    """A width or precision at `fmt[at:]`: `*` (the next argument, as Python takes it) or digits."""
    if at < len(fmt) and fmt[at] == "*":
        n = take()
        return at + 1, abs(n) if isinstance(n, int) else 0  # Python refuses a non-int itself
    end = at
    while end < len(fmt) and fmt[end] in "0123456789":  # ASCII digits only, as Python's `%` reads them
        end += 1
    if end == at:
        return at, None
    if end - at > 7:
        _too_big(float("inf") if end - at > 300 else float(fmt[at:end]), "a %-formatted field")
    return end, int(fmt[at:end])


def _percent_len(fmt: str, values) -> int:
    """Characters `fmt % values` has (up to just past the cap), without building it: the literal text plus, per
    conversion `%[(key)][flags][width][.precision][length]type`, the larger of its width and what it shows; a `*`
    width or precision is the next argument, as Python takes it."""
    args = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, dict) else None  # a dict is both the one argument and the mapping
    taken = 0

    def take():
        nonlocal taken
        taken += 1
        return args[taken - 1] if taken <= len(args) else None

    cap, total, at, n = _cap(), 0, 0, len(fmt)
    while at < n and total <= cap:
        start = fmt.find("%", at)
        if start < 0:
            total += n - at
            break
        total, at = total + start - at, start + 1
        if at < n and fmt[at] == "%":
            total, at = total + 1, at + 1
            continue
        key = None
        if at < n and fmt[at] == "(":  # a key, its parentheses nested as Python nests them
            depth, end = 1, at + 1
            while end < n and depth:
                depth += (fmt[end] == "(") - (fmt[end] == ")")
                end += 1
            key, at = fmt[at + 1:end - 1], end
        while at < n and fmt[at] in "-+ #0":
            at += 1
        at, width = _percent_number(fmt, at, take)
        precision = None
        if at < n and fmt[at] == ".":
            at, precision = _percent_number(fmt, at + 1, take)
            precision = precision or 0
        while at < n and fmt[at] in "hlL":
            at += 1
        if at >= n:
            break  # Python refuses an incomplete format itself
        kind, at = fmt[at], at + 1
        value = mapping.get(key) if key is not None and mapping is not None else take()
        if width is not None:
            _too_big(width, "a %-formatted field")
        if precision is not None:
            _too_big(precision, "a %-formatted field")
        total += max(width or 0, _field_len(value, kind, precision))
    return total


def _check_percent(fmt: str, values):
    """`fmt % values` (and `fmt|format(...)`): sized from every conversion and argument before it is built."""
    _too_big(_percent_len(fmt, values), "a %-formatted string")


_SPEC_TYPE = re.compile(r"(?:\.(\d+))?([bcdeEfFgGnosxX%])?$")  # a format spec's precision and type, at its end


def _check_str_format(fmt: str, args, kwargs):
    """`fmt.format(*args, **kwargs)`: the literal text plus, per field, the larger of its width and what its value
    shows in its type and precision; a nested `{:{}}` / `{:.{}f}` spec is resolved from the arguments first."""
    _check_format_spec(fmt)
    total, auto = 0, 0

    def lookup(field: str):
        nonlocal auto
        key = re.split(r"[.\[]", field, maxsplit=1)[0]
        if key == "":
            key, auto = str(auto), auto + 1
        if key.isdecimal():
            return args[int(key)] if int(key) < len(args) else ""
        return kwargs.get(key, "")

    for literal, field, spec, conversion in string.Formatter().parse(fmt):
        _tick()
        total += len(literal)
        if field is None:
            continue
        value, spec = lookup(field), spec or ""
        if "{" in spec:  # nested fields: their values' text becomes the spec (numbered after the outer field)
            parts = []
            for spec_literal, nested, _, _ in string.Formatter().parse(spec):
                parts.append(spec_literal)
                if nested is not None:
                    inner = lookup(nested)
                    _check_text(inner, "a nested format spec")
                    parts.append(str(inner))
            spec = "".join(parts)
            _check_format_spec(spec)
        precision, kind = _SPEC_TYPE.search(spec).groups()
        precision = None if precision is None else int(precision)
        if conversion in ("r", "a"):
            shown = _field_len(value, conversion, precision)
        elif kind is None:
            shown = max(_field_len(value, "s", None), _field_len(value, "f", precision) if precision else 0)
        else:
            shown = _field_len(value, kind, precision)
        if "," in spec or "_" in spec:  # digit grouping: a separator every three digits
            shown += shown // 3 + 1
        total += max(shown, _widest(spec))
        if total > _cap():
            break
    _too_big(total, "a formatted string")


def _check_replace(s, old, new, count):
    """`s.replace(old, new, count)`; jinja's |replace stringifies all three first (an undefined `old` is '')."""
    for v in (s, old, new):
        _check_text(v, "the text of a replace argument")
    s, old, new = (v if isinstance(v, str) else str(v) for v in (s, old, new))
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _too_big(len(s) + hits * max(0, len(new) - len(old)), "a replaced string")


def _check_join(sep: str, items, what: str = "a join") -> list[str]:
    """The pieces of `sep.join(items)`, sized as they come (items may be a generator): deadline at each."""
    pieces, total = [], 0
    for item in items:
        _tick()
        _check_text(item, "a joined item")
        piece = str(item)
        total += len(piece) + (len(sep) if pieces else 0)
        _too_big(total, what)
        pieces.append(piece)
    return pieces


def _escaped_len(s) -> int:
    if not isinstance(s, str):
        return 6 * text_len(s)
    return len(s) + 4 * (s.count("&") + s.count('"') + s.count("'")) + 3 * (s.count("<") + s.count(">"))


# --- the methods a template may call, each with its sizer ----------------------------------------------------------

STR_METHODS = frozenset("""startswith endswith strip lstrip rstrip split rsplit splitlines lower upper title
    capitalize casefold swapcase replace find rfind index rindex count join format format_map center ljust rjust
    zfill expandtabs partition rpartition removeprefix removesuffix isdigit isalpha isalnum isspace isupper islower
    istitle isnumeric isdecimal isidentifier isascii isprintable""".split())
SEQUENCE_METHODS = frozenset(["index", "count"])
DICT_METHODS = frozenset(["get", "items", "keys", "values"])
_RUNTIME_OWNERS = (jinja2.runtime.LoopContext, jinja2.utils.Cycler, jinja2.utils.Joiner)


def _method_allowed(owner, name: str) -> bool:
    if isinstance(owner, str):
        return name in STR_METHODS
    if isinstance(owner, dict):
        return name in DICT_METHODS
    if isinstance(owner, (list, tuple)):
        return name in SEQUENCE_METHODS
    return isinstance(owner, _RUNTIME_OWNERS)


def _check_callable(env: "BoundedEnvironment", obj):
    if isinstance(obj, (jinja2.runtime.Macro, jinja2.runtime.Undefined, jinja2.runtime.LoopContext,
                        jinja2.runtime.BlockReference, jinja2.utils.Joiner)):
        return
    if getattr(obj, "_fornax_allowed", False) or any(obj is g for g in env.allowed_globals):
        return
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "?")
    if isinstance(obj, (types.BuiltinMethodType, types.MethodType)) and owner is not None \
            and not isinstance(owner, types.ModuleType) and _method_allowed(owner, name):
        return
    raise TemplateLimitError(f"the chat template calls {name!r}, which chat templates may not use here")


def _check_method(obj, args, kwargs):
    """Sizes a str method will build, from all of its arguments, before it runs."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, (str, list, tuple, dict)):
        return  # macros, namespace(), dict(), cycler(): they build nothing from a number
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool):
            _too_big(v, "a value sized by an argument")
    if not isinstance(owner, str):
        return
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _too_big(max(len(owner), args[0]), "a padded string")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        _too_big(len(owner) + owner.count("\t") * max(0, size if isinstance(size, int) else 0), "an expanded string")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))


def _sized_items(items):
    """A filter's generator (map, select, batch, ...): deadline at each item, and the items' text all together
    within the cap, so a consumer that keeps them (|list, |sort) cannot hold more."""
    total = 0
    for item in items:
        _tick()
        if not isinstance(item, (int, float)) and item is not None:  # numbers: `range` gives 100 000 of them
            total += text_len(item)
            _too_big(total, "the items of a filter")
        yield item


def _checked_result(result):
    """A safety net after every filter and call: no string or container past the cap, generators tick."""
    if isinstance(result, str):
        _too_big(len(result), "a string")
    elif isinstance(result, (list, tuple, dict)):
        _too_big(text_len(result), "a list, tuple or dict")
    elif isinstance(result, (types.GeneratorType, map, filter, zip)):
        return _sized_items(result)
    return result


# --- the compiler and the environment --------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Writes `environment.tick()` where jinja writes the `pass` that opens every block body, routes every output
    through `environment.write`, `~` through `environment.concat_checked` and literals through
    `environment.built`."""

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

    def _output_const_repr(self, group):
        return f"environment.write({super()._output_const_repr(group)})"

    def _output_child_pre(self, node, frame, finalize):
        self.write("environment.write(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node, frame, finalize):
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    def _sized_literal(visit):
        def visit_sized(self, node, frame):
            if getattr(node, "ctx", "load") != "load":  # `{% for a, b in ... %}`: an assignment target
                return visit(self, node, frame)
            self.write("environment.built(")
            visit(self, node, frame)
            self.write(")")
        return visit_sized

    visit_List = _sized_literal(CodeGenerator.visit_List)
    visit_Tuple = _sized_literal(CodeGenerator.visit_Tuple)
    visit_Dict = _sized_literal(CodeGenerator.visit_Dict)
    del _sized_literal


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])
    allowed_globals: tuple = ()

    @staticmethod
    def tick():
        _tick()

    @staticmethod
    def write(text: str) -> str:
        return _write(text)

    @staticmethod
    def built(value):
        _too_big(text_len(value), "a list, tuple or dict")
        return value

    @staticmethod
    def concat_checked(parts) -> str:
        total = 0
        for p in parts:
            total += text_len(p)
            _too_big(total, "a `~` concatenation")
        return "".join(map(str, parts))

    def call_binop(self, context, op, left, right):
        _tick()
        _check_binop(op, left, right)
        return super().call_binop(context, op, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's own signature
        _tick()
        _check_callable(__self, __obj)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") == "join" and len(args) == 1 and not kwargs:
            return owner.join(_check_join(owner, _only_strings(args[0])))
        _check_method(__obj, args, kwargs)
        return _checked_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"
        _check_format_spec(fmt)  # at attribute access, before the wrapped method can be called

        def sized_format(*args, **kwargs):
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                _check_str_format(fmt, (), args[0])
            else:
                _check_str_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        sized_format._fornax_allowed = True
        return sized_format


def _only_strings(items):
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"sequence item {i}: expected str instance, {type(item).__name__} found")
        yield item


def _check_binop(op, left, right):
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _too_big(text_len(seq) * max(0, n), "a repeated string or list")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
            raise TemplateLimitError("the chat template multiplies numbers into one over 4096 bits")
    elif op == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
        if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 4096:
            raise TemplateLimitError(f"the chat template computes {left!r} ** {right!r}, a number over 4096 bits")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        _too_big(text_len(left) + text_len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_percent(left, right)


# --- filters ------------------------------------------------------------------------------------------------------

ALLOWED_FILTERS = frozenset("""abs attr batch capitalize center count d default dictsort e escape filesizeformat
    first float forceescape format groupby indent int items join last length list lower map max min random reject
    rejectattr replace reverse round safe select selectattr slice sort string striptags sum title tojson trim
    truncate unique upper wordcount wordwrap""".split())
# filters that turn their input into text (a list included): the text is measured before they run
STRINGIFYING = frozenset("""capitalize center e escape forceescape format indent lower replace safe string
    striptags title trim truncate upper wordcount wordwrap""".split())


def _size_filter(name: str, a: dict):
    """Per-filter sizes from the bound arguments (jinja's own parameter names)."""
    if name == "center":
        width = a.get("width", 80)
        _too_big(max(text_len(a["value"]), width if isinstance(width, int) else 0), "a centred string")
    elif name == "indent":
        width, s = a.get("width", 4), a["s"]
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = (s.count("\n") if isinstance(s, str) else text_len(s)) + 1
        _too_big(text_len(s) + lines * pad, "an indented string")
    elif name == "replace":
        _check_replace(a["s"], a["old"], a["new"], a.get("count"))
    elif name == "wordwrap":
        wrap, s = a.get("wrapstring") or "\n", a["s"]
        _too_big(text_len(s) * (1 + len(wrap) if isinstance(wrap, str) else 1), "a wrapped string")
    elif name == "format" and isinstance(a["value"], str):
        _check_percent(a["value"], a.get("kwargs") or tuple(a.get("args", ())))
    elif name in ("e", "escape", "forceescape"):
        _too_big(_escaped_len(a["s"]), "an escaped string")


def _bounded_filter(name: str, f):
    """A built-in filter whose integer arguments (widths, counts) and output are sized before it runs."""
    inner = inspect.unwrap(f)  # jinja's async_variant wraps sync filters and passes them an eval context first
    signature = inspect.signature(inner)
    skip = 1 if getattr(f, "jinja_pass_arg", None) else 0
    drop = 1 if skip and not getattr(inner, "jinja_pass_arg", None) else 0

    def wrapper(*args, **kwargs):
        _tick()
        for v in list(args[skip + 1:]) + list(kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool):
                _too_big(v, f"the |{name} filter's width or count")
        bound = signature.bind(*args[drop:], **kwargs).arguments
        value = args[skip] if len(args) > skip else None
        if name in STRINGIFYING:
            _check_text(value, f"the text |{name} works on")
        _size_filter(name, bound)
        return _checked_result(f(*args, **kwargs))

    if hasattr(f, "jinja_pass_arg"):  # keep the pass_context / pass_environment / pass_eval_context marker
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    wrapper.__name__ = name
    return wrapper


def _refused_filter(name: str):
    def refuse(*args, **kwargs):
        raise TemplateLimitError(f"the chat template uses the |{name} filter, which chat templates may not use here")
    return refuse


@jinja2.pass_environment
def _join(environment, value, d="", attribute=None):
    """jinja's |join (no autoescape here), sized and ticking as its items come."""
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    sep = str(d)
    return sep.join(_check_join(sep, value))


@jinja2.pass_environment
def _sum(environment, iterable, attribute=None, start=0):
    """jinja's |sum, each addition sized and the deadline checked at each item (`sum(start=[])` is quadratic)."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    if isinstance(start, str):  # as Python's sum
        raise TypeError("sum() can't sum strings [use ''.join(seq) instead]")
    total = start
    for item in iterable:
        _tick()
        _check_binop("+", total, item)
        total = total + item
    return total


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson, its JSON measured (indentation included) before it is built."""
    _tick()
    if isinstance(indent, int) and not isinstance(indent, bool):
        _too_big(indent, "a JSON indent")
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    _too_big(json_len(x, indent=pad, ensure_ascii=ensure_ascii, separators=separators), "a JSON text")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# --- globals --------------------------------------------------------------------------------------------------------

def _range(*args):
    """The sandbox's range (at most 100 000 items), with the deadline checked as it is iterated."""
    for i in safe_range(*args):
        _tick()
        yield i


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt):
    if isinstance(fmt, str):  # glibc pads `%1000000Y` to a million characters; `%c` is ~24 per field
        _check_format_spec(fmt)
        _too_big(len(fmt) + fmt.count("%") * max(64, _widest(fmt)), "a formatted date")
    return datetime.now().strftime(fmt)


def _refused_global(name: str):
    def refuse(*args, **kwargs):
        raise TemplateLimitError(f"the chat template calls {name!r}, which chat templates may not use here")
    return refuse


def make_environment() -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                             finalize=_finalize)
    env.filters = {name: _bounded_filter(name, f) if name in ALLOWED_FILTERS else _refused_filter(name)
                   for name, f in env.filters.items()}
    env.filters["join"] = _bounded_filter("join", _join)
    env.filters["sum"] = _bounded_filter("sum", _sum)
    env.filters["tojson"] = _tojson
    env.globals["lipsum"] = _refused_global("lipsum")  # 43 s for `lipsum(200000)`; no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_range)
    env.allowed_globals = tuple(env.globals.values())  # range, dict, cycler, joiner, namespace, and the above
    return env


def render(template: jinja2.Template, **context) -> str:
    """Render with the caps of `backend.limits` (output characters, seconds); TemplateLimitError past either."""
    caps = limits.current()
    _state.cap, _state.seconds, _state.written = caps.max_template_output_chars, caps.template_time_s, 0
    _state.deadline = time.monotonic() + caps.template_time_s
    out, n = [], 0
    try:
        for chunk in template.generate(**context):
            n += len(chunk)
            if n > caps.max_template_output_chars:
                raise TemplateLimitError(f"the chat template's output passed {caps.max_template_output_chars:,} "
                                         f"characters (max_template_output_chars)")
            _tick()
            out.append(chunk)
    except (MemoryError, OverflowError, RecursionError) as e:
        raise TemplateLimitError(f"the chat template ran out of room: {type(e).__name__}") from e
    finally:
        _state.deadline = _state.cap = None
    return "".join(out)
