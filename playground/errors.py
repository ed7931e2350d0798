"""Errors a user can cause, answered in plain words: `refusal` makes one, `user_errors` wraps a handler so that
nothing raw (a traceback, an internal exception) ever reaches the page."""
from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

import backend

log = logging.getLogger("playground")


def refusal(message: str) -> gr.Error:
    """An error the user caused, in plain words (and not logged with a traceback: nothing is broken)."""
    return gr.Error(message, print_exception=False)


def user_errors(fn):
    """Errors a user can cause reach the page as plain words; anything unexpected is logged, never shown raw."""
    def translate(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, backend.FornaxError):
            return refusal(str(e))
        log.exception("unexpected error in %s", fn.__name__)
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
