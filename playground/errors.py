"""Errors a user can cause, answered in plain words: `refusal` makes one, `user_errors` wraps a handler so that
nothing raw (a traceback, an internal exception) ever reaches the page."""
from __future__ import annotations

import functools
import inspect
import logging
import re

import gradio as gr

import backend

log = logging.getLogger("playground")

# An absolute path in a message: a slash at the start or after a space, quote, bracket or '=' (not a URL's "//"
# after "https:"), then path characters.
_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"`(\[=]))(?:~|/)[^\s'\"`()\[\],;]*")


def _public() -> bool:
    from backend import limits

    return limits.public_mode()


def without_paths(text: str) -> str:
    """`text` with every absolute path replaced by its last part (a file's name says what is meant; the folders
    around it are the server's business)."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "…", text)


def refusal(message: str) -> gr.Error:
    """An error the user caused, in plain words (and not logged with a traceback: nothing is broken). Gradio's toast
    renders the message as HTML, and it may quote a model's own text (a chat template's raise_exception): escaped."""
    return gr.Error(as_html_text(message), print_exception=False)


def as_html_text(text: str) -> str:
    """`text` that HTML shows as it is: no `<` can open a tag, no `&` an entity (a lone `>` is harmless, and kept so
    that "stride 64 > max_length 32" reads the same through the API)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def user_errors(fn):
    """Errors a user can cause reach the page as plain words; anything unexpected is logged, never shown raw."""
    def translate(e: Exception) -> gr.Error:
        public = _public()
        if isinstance(e, gr.Error):
            if public and isinstance(e.message, str):  # (already escaped where refusal() made it)
                return gr.Error(without_paths(e.message), print_exception=False)
            return e
        if isinstance(e, backend.FornaxError):
            return refusal(without_paths(str(e)) if public else str(e))
        log.exception("unexpected error in %s", fn.__name__)
        if public:  # raw exception text names server files and internals: logged above, not shown
            return refusal("something went wrong on the server; the app is still running, try again")
        return refusal(f"something went wrong ({type(e).__name__}: {e}); the app is still running, try again")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise translate(e) from None
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise translate(e) from None
    return function
