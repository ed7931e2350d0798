"""Tokenizer (a `tokenizers.Tokenizer` plus the model's special tokens) and chat-template rendering.

Built from an HF folder (tokenizer.json, or GPT-2's vocab.json + merges.txt) or from GGUF metadata.
Chat templates render in jinja2's sandbox the way transformers renders them; control tokens typed by a
user inside a message are encoded as plain text, so a message cannot forge `<|im_end|>` and take over the turn.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

import jinja2
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from . import chat_template, gguf_vocab
from .. import limits
from ..errors import GenerationError, ModelLoadError

# Used when a model ships no chat template (base models): plain "role: content" turns.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

# Tokens that end a turn in common chat formats; treated as end-of-sequence when the vocabulary has them as
# special tokens (llama.cpp does the same with its "end of generation" set).
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>", "<|eom_id|>")

_MARK_START, _MARK_END = "\ue000", "\ue001"  # private-use markers around user-typed control tokens
_NOT_CONTROL = "\ue002"  # the one "word" of the control-token finder: any text between control tokens


class Tokenizer:
    def __init__(self, tk: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, extra_special: dict | None = None):
        self.tk = tk
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template  # None: the model ships none (FALLBACK_CHAT_TEMPLATE is used)
        self.extra_special = extra_special or {}  # unk_token, pad_token, ...: passed to templates
        added = tk.get_added_tokens_decoder()  # (~2 s with 300k added tokens: read once)
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        self.special_ids = {v: k for k, v in self.special_ids.items()}  # id -> text
        self._added = list(added.values())
        self._lazy_lock = threading.Lock()  # builds the two helpers below once, whichever thread asks first
        self._finder: HFTokenizer | None = None    # finds control tokens in a message (see _control_finder)
        self._literal: HFTokenizer | None = None   # encodes special tokens' text as text (see _encode_literal)
        self._plain_added = {t.content for t in self._added if not t.special}

    # --- construction ---
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        try:
            if (folder / "tokenizer.json").exists():
                tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
                tk = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
                tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tk.decoder = decoders.ByteLevel()
            else:
                raise ModelLoadError(f"no tokenizer in {folder}: expected tokenizer.json (or vocab.json + merges.txt)")
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"tokenizer files in {folder} are unreadable: {e}") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))

        def token(name):
            t = cfg.get(name, special_map.get(name))
            return t.get("content") if isinstance(t, dict) else t

        extra = {n: token(n) for n in ("unk_token", "pad_token") if token(n)}
        return cls(tk, token("bos_token"), token("eos_token"), template, extra)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.*`; see gguf_vocab.py)."""
        return cls(*gguf_vocab.rebuild(meta))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (the chat template inside) as transformers reads them."""
        folder = Path(folder)
        self.tk.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, **self.extra_special, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # --- use ---
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_text(self, token_id: int) -> str:
        """What one token shows as text on its own (a partial UTF-8 byte shows as U+FFFD)."""
        return self.tk.decode([token_id], skip_special_tokens=False)

    def end_of_turn_ids(self) -> set[int]:
        ids = {self.token_to_id(t) for t in (self.eos_token, *END_OF_TURN_TOKENS) if t}
        return {i for i in ids if i is not None and (i in self.special_ids or self.id_to_text(i) == self.eos_token)}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of `messages` (what apply_chat_template(tokenize=False) gives)."""
        return self._render(messages, add_generation_prompt, mark=False)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; control tokens typed inside messages stay plain text."""
        rendered = self._render(messages, add_generation_prompt, mark=True)
        pieces = re.split(f"{_MARK_START}(.*?){_MARK_END}|[{_MARK_START}{_MARK_END}]", rendered)
        ids = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2:  # a control token the user typed: encode its characters, not the token
                ids += self._encode_literal(piece)
            else:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _render(self, messages, add_generation_prompt, mark: bool) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise GenerationError("a chat must be a list of {'role': ..., 'content': ...} messages")
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        cap = limits.current().max_prompt_chars
        if chars > cap:  # before the template or the tokenizer spends anything on it
            raise GenerationError(f"the chat is {chars:,} characters long; at most {cap:,} are allowed")
        if mark:
            def mark_text(v):
                if isinstance(v, str):
                    return self._mark_controls(v.replace(_MARK_START, "").replace(_MARK_END, ""))
                if isinstance(v, dict):
                    return {k: mark_text(x) for k, x in v.items()}
                if isinstance(v, list):
                    return [mark_text(x) for x in v]
                return v

            messages = mark_text(messages)
        try:
            template = _compile_template(self.chat_template or FALLBACK_CHAT_TEMPLATE)
            return chat_template.render(template, messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   tools=None, documents=None, **self.extra_special)
        except GenerationError:
            raise
        except jinja2.TemplateError as e:
            raise GenerationError(f"the chat template refused these messages: {e}") from e
        except Exception as e:  # the template is code from the model file: any failure of it is the file's
            raise GenerationError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e

    def _control_tokens(self):
        return [t.content for t in self._added]

    def _control_finder(self) -> HFTokenizer:
        """A tokenizer that knows only the added tokens, matched as plain strings, leftmost-longest (what the old
        regex alternation of every token did; tokenizers' Aho-Corasick does it in one pass, where the alternation
        of 300k tokens took ~35 s per call). Built once, on the first chat."""
        with self._lazy_lock:
            if self._finder is None:
                finder = HFTokenizer(models.WordLevel(vocab={_NOT_CONTROL: 0}, unk_token=_NOT_CONTROL))
                finder.add_tokens([AddedToken(t, normalized=False, special=False, single_word=False, lstrip=False,
                                              rstrip=False) for t in dict.fromkeys(self._control_tokens()) if t])
                self._finder = finder
            return self._finder

    def _mark_controls(self, text: str) -> str:
        """`text` with each control token in it wrapped in the private-use markers."""
        if not text:
            return text
        found = self._control_finder().encode(text, add_special_tokens=False)
        pieces, at = [], 0
        for token_id, (start, end) in zip(found.ids, found.offsets):
            if token_id != 0:  # 0: text between control tokens
                pieces += [text[at:start], _MARK_START, text[start:end], _MARK_END]
                at = end
        pieces.append(text[at:])
        return "".join(pieces)

    def _encode_literal(self, token: str) -> list[int]:
        """A control token the user typed, encoded as `encode_special_tokens=True` encodes it: a special token as
        its characters, a non-special added one as itself. The characters go through a second tokenizer object
        (the same model, normalizer and pre-tokenizer, no added tokens): flipping the flag on the shared one would
        change what another thread's encode gives meanwhile, and a copy of it would rebuild 300k added tokens."""
        if token in self._plain_added:
            return [self.tk.token_to_id(token)]
        with self._lazy_lock:
            if self._literal is None:
                literal = HFTokenizer(self.tk.model)
                if self.tk.normalizer is not None:
                    literal.normalizer = self.tk.normalizer
                if self.tk.pre_tokenizer is not None:
                    literal.pre_tokenizer = self.tk.pre_tokenizer
                self._literal = literal
        return self._literal.encode(token, add_special_tokens=False).ids


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name} in {path.parent} is not valid JSON: {e}") from e


_COMPILED: "OrderedDict[tuple, jinja2.Template | str]" = OrderedDict()  # (source, output cap) -> template or refusal
_COMPILED_LOCK = threading.Lock()
_COMPILED_KEEP = 16


def _compile_template(source: str) -> jinja2.Template:
    """The template compiled in a sandbox whose rendering is bounded in output length and time (chat_template.py).
    Compiling runs outside the render deadline, so its source is capped (jinja's lexer and parser spend seconds
    and memory on a long one), and a template that fails to compile is remembered as failing like one that
    compiles is remembered as compiled: every chat or gauge call would otherwise pay for parsing it again."""
    cap = limits.current().max_template_source_chars
    if len(source) > cap:
        raise chat_template.TemplateLimitError(f"the model's chat template is {len(source):,} characters long; at most "
                                               f"{cap:,} are allowed (max_template_source_chars)")
    key = (source, limits.current().max_template_output_chars)  # constant folding at compile time sizes by the cap
    with _COMPILED_LOCK:
        known = _COMPILED.get(key)
        if known is not None:
            _COMPILED.move_to_end(key)
    if known is None:
        try:
            known = chat_template.make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            known = f"the model's chat template does not parse: {e}"
        except (RecursionError, MemoryError) as e:  # nesting past the parser's stack, or past memory
            known = f"the model's chat template is nested too deeply to compile ({type(e).__name__})"
        with _COMPILED_LOCK:
            _COMPILED[key] = known
            while len(_COMPILED) > _COMPILED_KEEP:
                _COMPILED.popitem(last=False)
    if isinstance(known, str):
        raise GenerationError(known)  # a fresh error each time: one re-raised would pile up tracebacks
    return known
