"""Deployment mode and the caps a public Space enforces before anything is allocated, downloaded or copied.

Public mode (`FORNAX_PUBLIC=1`; on by default when `SPACE_ID` is set) refuses server paths and applies every cap
below; private mode (a local user, the default otherwise) keeps full freedom: the caps are then the generous
"private" values. Each cap can be overridden by its environment variable, e.g. `FORNAX_MAX_UPLOAD_BYTES=1e9`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from .errors import FornaxError


class LimitError(FornaxError):
    """A request or a file is over a cap of this deployment."""


def public_mode() -> bool:
    """FORNAX_PUBLIC=1/0 decides; unset, a Hugging Face Space (SPACE_ID) is public and anything else private.
    The playground also switches it on when it binds a non-loopback host (see playground.__main__)."""
    flag = os.environ.get("FORNAX_PUBLIC")
    if flag is not None and flag.strip() != "":
        return flag.strip().lower() not in ("0", "false", "no", "off")
    return bool(os.environ.get("SPACE_ID"))


@dataclass(frozen=True)
class Limits:
    """(public value, private value) per cap; `current()` picks one set and applies env overrides."""
    max_upload_bytes: int = 200 * 1024**2
    max_model_params: int = 2_000_000_000
    max_model_bytes: int = 8 * 1024**3          # weight bytes as declared by the files, before download / load
    max_context: int = 262144                   # the context a model may declare (tables are built for the length in use)
    max_new_tokens: int = 1_000_000             # private: the model's context is the real bound
    max_num_samples: int = 16
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_prompt_chars: int = 1_000_000           # prompt or whole chat history, before tokenizing
    max_gguf_metadata_bytes: int = 64 * 1024**2
    max_vocab: int = 1_000_000
    max_token_bytes: int = 4096
    max_merges: int = 2_000_000
    max_gguf_array_items: int = 6_000_000       # gguf's reader builds ~1.1 KB of Python objects per array item
    max_merge_work: int = 200_000_000           # characters hashed deriving SentencePiece merges (sum of len^2)
    max_layers: int = 1024
    max_template_output_chars: int = 4_000_000  # a rendered chat template
    max_template_source_chars: int = 4_000_000  # a chat template's source (compiled outside its render deadline)
    template_time_s: float = 10.0
    max_finetune_steps: int = 1_000_000
    max_batch_size: int = 1024
    max_lora_r: int = 1024
    max_export_params: int = 2_000_000_000
    event_time_limit_s: float = 0.0             # 0 = none
    cache_bytes: int = 50 * 1024**3             # GGUF conversions + exports + zips + kept uploads, LRU-evicted
    kernel_lab_cpu_elements: int = 1_000_000    # Kernel lab inputs in Triton's interpreter (slow: ~2 s per 1M)
    kernel_lab_gpu_elements: int = 256 * 1024**2  # Kernel lab inputs on a GPU
    max_fill_mask_chars: int = 1_000_000        # fill-mask / pseudo-log-likelihood text (PLL: one forward per token)
    max_fill_mask_top_k: int = 100              # candidates per [MASK]
    memory_budget_bytes: int = 0                # one request's weights + KV cache + activations (0 = physical RAM)
    max_upload_files: int = 1000                # files one upload request may carry (each within max_upload_bytes)
    max_train_seconds: float = 0.0              # a training job's wall-clock limit (then stopped with a checkpoint); 0 = none
    max_train_seq_len: int = 262144             # tokens per training sequence
    max_train_evals: int = 1_000_000            # validation passes in one job (steps / eval_every)
    max_sample_prompts: int = 1000              # sample prompts of one job
    max_sample_prompt_chars: int = 100_000      # characters of one sample prompt
    max_data_rows: int = 100_000_000            # rows (non-blank lines) read from one data file, counted while reading
    max_eval_rows: int = 10_000_000             # examples in one evaluation
    max_eval_labels: int = 100_000              # labels one classification ranks on every row
    max_eval_chars: int = 100_000_000           # characters of one text / prompt / reference in an evaluation
    max_eval_total_chars: int = 2_000_000_000   # characters of an evaluation's texts, all rows together
    max_eval_tokens: int = 10_000_000_000       # token positions through the model in one evaluation, all forwards
    max_eval_forwards: int = 1_000_000_000      # forwards of one evaluation (windows, label rows, generated tokens)
    max_chat_messages: int = 1_000_000          # messages in one chat, every branch (each counts chat_message_chars)
    chat_message_chars: int = 16                # what one message counts against max_prompt_chars, empty or not
    max_request_bytes: int = 0                  # one HTTP request body besides uploads (0 = none)
    max_role_chars: int = 1_000_000             # an OpenAI API message's role
    stream_send_timeout_s: float = 120.0        # a streamed answer's client not reading for this long loses it
    max_queued_per_session: int = 1_000_000     # queued + running events of one browser session
    max_queued_per_address: int = 1_000_000     # queued + running events from one address
    max_upload_bytes_per_hour: int = 0          # upload bytes one address may send per hour (0 = none)

    @staticmethod
    def public_defaults() -> "Limits":
        return Limits(max_upload_bytes=300 * 1024**2, max_model_params=600_000_000, max_model_bytes=2 * 1024**3,
                      max_context=8192, max_new_tokens=1024, max_num_samples=4, max_stop_strings=8,
                      max_stop_chars=64, max_prompt_chars=60_000, max_gguf_metadata_bytes=16 * 1024**2,
                      max_vocab=300_000, max_token_bytes=1024, max_merges=600_000,
                      max_gguf_array_items=1_000_000, max_merge_work=50_000_000, max_layers=256,
                      max_template_output_chars=200_000, max_template_source_chars=50_000, template_time_s=2.0, max_finetune_steps=2000,
                      max_batch_size=16, max_lora_r=64, max_export_params=600_000_000, event_time_limit_s=600.0,
                      cache_bytes=20 * 1024**3, kernel_lab_cpu_elements=40_000,
                      kernel_lab_gpu_elements=16 * 1024**2, max_fill_mask_chars=500, max_fill_mask_top_k=20,
                      memory_budget_bytes=4 * 1024**3, max_upload_files=4, max_train_seconds=1800.0,
                      max_train_seq_len=1024, max_train_evals=50, max_sample_prompts=8, max_sample_prompt_chars=500, max_data_rows=1_000_000, max_eval_rows=1000,
                      max_eval_labels=20, max_eval_chars=100_000, max_eval_total_chars=1_000_000,
                      max_eval_tokens=500_000, max_eval_forwards=20_000, max_chat_messages=400,
                      max_request_bytes=4 * 1024**2, max_role_chars=32, stream_send_timeout_s=10.0,
                      max_queued_per_session=8, max_queued_per_address=32,
                      max_upload_bytes_per_hour=1024**3)


def current() -> Limits:
    """The caps in force now: public or private defaults, each overridable by FORNAX_<NAME> (upper case)."""
    base = Limits.public_defaults() if public_mode() else Limits()
    overrides = {}
    for f in fields(Limits):
        raw = os.environ.get("FORNAX_" + f.name.upper())
        if raw is None or raw.strip() == "":
            continue
        try:
            value = float(raw)
        except ValueError as e:
            raise LimitError(f"FORNAX_{f.name.upper()}={raw!r} is not a number") from e
        overrides[f.name] = value if f.type == "float" else int(value)
    return base if not overrides else Limits(**{**base.__dict__, **overrides})


def check(value: float, cap: float, what: str) -> None:
    """Raise LimitError naming `what` when value > cap, or when value is not a number at all (NaN passes `>`)."""
    if isinstance(value, float) and math.isnan(value):
        raise LimitError(f"{what} is not a number (NaN)")
    if value > cap:
        raise LimitError(f"{what} is {value:,} but this {'public' if public_mode() else 'local'} deployment allows "
                         f"at most {cap:,}")
