"""What a visitor may do on this deployment: in public mode (`backend.limits.public_mode()`) no server paths, only
allowlisted Hub ids, uploads within the size cap, every sampling value within its cap whatever the API client
sends, a time limit per event, no Hub token of the server's, and training jobs owned by the browser session that
started them. Private mode (a local user) keeps full freedom; the caps are then the generous private ones.

Checks here run before anything touches the file system, so a refusal never says whether a path exists.
"""
from __future__ import annotations

import os

import gradio as gr

from backend import limits
from backend.loading import DEFAULT_HUB_ID

from .errors import refusal
from .streaming import session_key

# Sources each browser session may load although they are paths: the folders of its own finished training jobs.
_granted: dict[str, set[str]] = {}


def public() -> bool:
    return limits.public_mode()


def hub_allowlist() -> list[str]:
    """FORNAX_HUB_ALLOWLIST (comma-separated Hub ids); unset: the default model's Hub id only."""
    raw = os.environ.get("FORNAX_HUB_ALLOWLIST")
    if raw is None:
        return [DEFAULT_HUB_ID]
    return [r.strip() for r in raw.split(",") if r.strip()]


def job_owner(request: gr.Request | None) -> str | None:
    """Who owns a training job started by this request: its browser session in public mode, nobody in private."""
    return session_key(request) if public() else None


def grant(request: gr.Request | None, folder: str) -> None:
    """Let this session load `folder` (the result of its own training job) although it is a path."""
    _granted.setdefault(session_key(request), set()).add(folder)


def check_source(source: str, request: gr.Request | None = None) -> None:
    """Public mode: `default`, an allowlisted Hub id, or a folder granted to this session; one message for
    everything else, existing or not."""
    if not public() or source == "default" or source in hub_allowlist():
        return
    if source in _granted.get(session_key(request), ()):
        return
    allowed = ", ".join(["default", *hub_allowlist()])
    raise refusal(f"this public deployment loads only these models: {allowed}, or a .gguf file you upload "
                  f"(paths on the server are not available)")


def check_upload(path: str, what: str = "the upload") -> None:
    """An uploaded file within the upload cap, checked before it is read or copied (Gradio's own `max_file_size`
    refuses bigger ones already; this holds for any other way a file arrives)."""
    if not public():
        return
    limits.check(os.path.getsize(path), limits.current().max_upload_bytes, f"{what}'s size in bytes")


def check_sampling(params: dict, prompt_chars: int) -> None:
    """The panel's values against the caps, before anything is tokenized or allocated."""
    if not public():
        return
    caps = limits.current()
    for name, cap in (("max_new_tokens", caps.max_new_tokens), ("num_samples", caps.max_num_samples)):
        value = params.get(name)
        if isinstance(value, (int, float)):
            limits.check(value, cap, name)
    stops = params.get("stop") or []
    limits.check(len(stops), caps.max_stop_strings, "the number of stop strings")
    for s in stops:
        limits.check(len(s), caps.max_stop_chars, "a stop string's length in characters")
    limits.check(prompt_chars, caps.max_prompt_chars, "the prompt's length in characters")


def check_fill_mask(text_chars: int, top_k: int | None = None) -> None:
    """Fill-mask and pseudo-log-likelihood requests against the caps (PLL runs one forward per token)."""
    caps = limits.current()
    limits.check(text_chars, caps.max_fill_mask_chars, "the text's length in characters")
    if top_k is not None:
        limits.check(top_k, caps.max_fill_mask_top_k, "top-k")


def check_training(steps: int, batch_size: int, lora_r: int) -> None:
    if not public():
        return
    caps = limits.current()
    limits.check(steps, caps.max_finetune_steps, "steps")
    limits.check(batch_size, caps.max_batch_size, "batch size")
    limits.check(lora_r, caps.max_lora_r, "LoRA rank")


def event_options() -> dict:
    """Queue options of an event that runs the model: its time limit (none in private mode by default)."""
    seconds = limits.current().event_time_limit_s
    return dict(time_limit=seconds) if seconds > 0 else {}


def refuse_server_token() -> None:
    """Public mode: the Hub client never sends the server's token (HF_TOKEN, a login) for a visitor's download,
    so a visitor cannot reach private repos through it."""
    import huggingface_hub.constants

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
