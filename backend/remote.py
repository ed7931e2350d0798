"""A handle whose generation runs on another server through its OpenAI API (vLLM, llama.cpp's server, Fornax).

`load_remote("openai+http://HOST:PORT/v1#model-id")` (what `backend.load` calls for such a source, see
backend/formats/remote.py) returns a `RemoteHandle`: a `ModelHandle` with one backend, "remote", whose `stream` /
`generate` send the prompt's token ids to `POST /v1/completions` (streamed, `logprobs` asked for) and turn the
server-sent events back into the same `Delta`s and `GenerationResult` a local run gives. Prompts are tokenized here,
chat messages rendered with the model's chat template here, so a greedy answer is token for token the local one.

The tokenizer comes from `FORNAX_REMOTE_TOKENIZER` (a folder or Hub id, the operator's), else from the model id when
that names a local folder or a cached Hub id (vLLM's default model id is the folder it serves). There are no
logits on this side: `logits` (perplexity) is a plain error. A dead server, a timeout, a 4xx/5xx or a malformed
stream is a plain `GenerationError` / `ModelLoadError`; nothing of the server's raw text beyond a short message.
"""
from __future__ import annotations

import json
import time

import torch

from . import limits
from .budget import Deadline
from .errors import FornaxError, GenerationError, ModelLoadError
from .formats import remote as sources
from .formats.tokenizer import Tokenizer
from .generation.generate import Completion, Delta, GenerationResult, Stream, Timings, TokenInfo
from .generation.sampling import SamplingParams
from .handle import ModelHandle
from .models.config import ModelConfig
from .runners.remote import FINISH, NO_LOGITS, RemoteClient, RemoteError, RemoteRunner


class RemoteHandle(ModelHandle):
    """A ModelHandle with no weights here: `stream` and `generate` go to the server; the rest is local."""

    def runner_names(self) -> list[str]:
        return list(self.runners)

    def runner(self, name: str | None = None, progress=None):
        name = name or self.backend
        if name not in self.runners:
            raise GenerationError(f"no backend {name!r}; a remote model has one: remote")
        return self.runners[name]

    @property
    def client(self) -> RemoteClient:
        return self.runners["remote"].client

    def info(self) -> dict:
        cfg = self.config
        return dict(source=self.source, name=cfg.name, family="remote", model_type="openai-api",
                    capabilities=dict(self.family.capabilities(), quants=[]),  # the server's weights: no export
                    parameters=0, layers=0, heads=0, kv_heads=0, d_model=0, vocab_size=cfg.vocab_size,
                    context_length=cfg.max_seq_len, dtype="remote", device=f"remote {self.client.source.address}",
                    weight_bytes=0, load_seconds=round(self.load_seconds, 2),
                    chat_template="model" if self.chat_template else "fallback", runners=self.runner_names(),
                    prepared=list(self.runners), remote=self.client.source.address)

    def logits(self, input_ids, attention_mask=None, dtype=torch.float32):
        raise GenerationError(NO_LOGITS)

    def check_generation_memory(self, runner, batch: int, prompt_len: int, max_new: int) -> None:
        pass  # the server holds the KV cache, not this process

    def stream(self, prompt_or_messages, backend: str | None = None, should_stop=None, prefill_progress=None,
               deadline: Deadline | None = None, **params) -> Stream:
        """As ModelHandle.stream (same checks, same Deltas and result), the tokens coming from the server."""
        p = SamplingParams.from_kwargs(**params)
        prompt_ids = self.encode(prompt_or_messages)
        ctx = self.config.max_seq_len
        if len(prompt_ids) + p.max_new_tokens > ctx:
            raise GenerationError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                                  f"the context of {ctx}; ask for at most {max(ctx - len(prompt_ids), 0)} new tokens")
        self.runner(backend)

        def locked():
            self._acquire(deadline)
            try:
                return (yield from self._remote_run(prompt_ids, p, should_stop, deadline))
            finally:
                self._lock.release()
        return Stream(locked())

    def _request(self, prompt_ids: list[int], p: SamplingParams) -> dict:
        body = {"model": self.config.name, "prompt": prompt_ids, "max_tokens": p.max_new_tokens,
                "temperature": p.temperature, "n": p.num_samples, "logprobs": p.top_logprobs}
        optional = {"top_p": (p.top_p, 1.0), "presence_penalty": (p.presence_penalty, 0.0),
                    "frequency_penalty": (p.frequency_penalty, 0.0), "top_k": (p.top_k, 0), "min_p": (p.min_p, 0.0),
                    "repetition_penalty": (p.repetition_penalty, 1.0), "seed": (p.seed, None)}
        # (ignore_eos is not sent: vLLM takes it, but Fornax's own API and OpenAI refuse it, so it stays local)
        body.update({k: v for k, (v, neutral) in optional.items() if v != neutral})  # extensions only when used
        if p.stop:
            body["stop"] = list(p.stop)
        return body

    def _remote_run(self, prompt_ids: list[int], p: SamplingParams, should_stop, deadline: Deadline | None):
        t0 = time.perf_counter()
        collected = [_Collected() for _ in range(p.num_samples)]
        timings = Timings(prompt_tokens=len(prompt_ids), batch=p.num_samples)
        events = self.client.post_stream("/completions", self._request(prompt_ids, p), deadline)
        try:
            for event in events:
                for choice in _choices(event, p.num_samples, self.client.source.address):
                    got = collected[choice["index"]]
                    if got.add(choice) and not timings.ttft_s:
                        timings.ttft_s = timings.prefill_s = time.perf_counter() - t0
                    if got.pending:
                        yield Delta(choice["index"], got.pending)
                        got.pending = ""
                if (deadline is not None and deadline.expired) or (should_stop is not None and should_stop()):
                    reason = "time" if deadline is not None and deadline.expired else "cancelled"
                    for got in collected:
                        got.finish = got.finish or reason
                    break
        finally:
            events.close()
        timings.decode_s = max(time.perf_counter() - t0 - timings.prefill_s, 0.0)
        completions = [got.completion(self.tokenizer, p.stop) for got in collected]
        timings.new_tokens = sum(len(c.token_ids) for c in completions)
        timings.decode_steps = max((len(c.token_ids) for c in completions), default=1) - 1
        return GenerationResult(completions, list(prompt_ids), timings, p.seed if p.seed is not None else -1)


def _choices(event: dict, n: int, address: str) -> list[dict]:
    choices = event.get("choices", [])
    ok = isinstance(choices, list) and all(isinstance(c, dict) and isinstance(c.get("index", 0), int)
                                           and 0 <= c.get("index", 0) < n for c in choices)
    if not ok:
        raise RemoteError(f"the remote server at {address} sent a malformed stream (bad choices)")
    return [{**c, "index": c.get("index", 0)} for c in choices]


class _Collected:
    """One choice's text, tokens and finish reason, gathered over the stream's chunks."""

    def __init__(self):
        self.text, self.pending, self.finish = "", "", None
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.top: list[dict] = []

    def add(self, choice: dict) -> bool:
        """Take one chunk's choice; True when it carried text."""
        text = choice.get("text")
        if text is None:  # a chat-shaped chunk
            text = (choice.get("delta") or {}).get("content")
        if text is not None and not isinstance(text, str):
            raise RemoteError("the remote server sent a malformed stream (text is not a string)")
        text = text or ""
        self.text += text
        self.pending += text
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("tokens"), list):
            try:
                self.tokens += [str(t) for t in lp["tokens"]]
                self.logprobs += [float(x) if x is not None else 0.0 for x in lp.get("token_logprobs") or []]
                self.top += [{str(k): float(v) for k, v in t.items()} if isinstance(t, dict) else {}
                             for t in lp.get("top_logprobs") or []]
            except (TypeError, ValueError, AttributeError):
                raise RemoteError("the remote server sent a malformed stream (bad logprobs)") from None
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
        return bool(text)

    def completion(self, tokenizer: Tokenizer, stop: list[str]) -> Completion:
        ids = _token_ids(tokenizer, self.tokens, self.text)
        infos = []
        for i, token_id in enumerate(ids):
            text = self.tokens[i] if i < len(self.tokens) else tokenizer.id_to_text(token_id)
            lp = self.logprobs[i] if i < len(self.logprobs) else 0.0
            alts = self.top[i] if i < len(self.top) else {}
            infos.append(TokenInfo(token_id, text, lp, [(_id_of(tokenizer, s), s, float(v)) for s, v in alts.items()]))
        finish = FINISH.get(self.finish, "length" if self.finish is None else "stop")
        if finish == "eos" and stop and self.finish == "stop" and _ends_short(self.text, ids, tokenizer):
            finish = "stop"
        return Completion(self.text, ids, infos, finish)


def _ends_short(text: str, ids: list[int], tokenizer: Tokenizer) -> bool:
    """Whether a stop string cut the text (it is shorter than its tokens' text)."""
    return len(tokenizer.decode(ids, skip_special_tokens=True)) > len(text)


def _vocab_index(tokenizer: Tokenizer) -> dict[str, int | None]:
    """Each token's text -> its id (None where two tokens show the same text), built once per tokenizer."""
    index = getattr(tokenizer, "_remote_text_index", None)
    if index is None:
        index = {}
        for i in range(tokenizer.vocab_size):
            text = tokenizer.id_to_text(i)
            index[text] = None if text in index else i
        tokenizer._remote_text_index = index
    return index


def _id_of(tokenizer: Tokenizer, text: str) -> int:
    if text.startswith("token_id:") and text[9:].isdigit():  # vLLM's return_tokens_as_token_ids
        return int(text[9:])
    found = _vocab_index(tokenizer).get(text)
    return -1 if found is None else found


def _token_ids(tokenizer: Tokenizer, tokens: list[str], text: str) -> list[int]:
    """The generated token ids: from the server's token texts where each names one token, else the text
    re-encoded (the ids may then differ from those sampled where the text has several tokenizations)."""
    ids = [_id_of(tokenizer, t) for t in tokens]
    if tokens and all(i >= 0 for i in ids):
        return ids
    return tokenizer.encode(text, add_special_tokens=False) if text else []


# --- loading ---

def load_remote(source: str, resolve, tokenizer: Tokenizer | str | None = None) -> RemoteHandle:
    """Connect to the server of a remote source (checked against the public allowlist), find its model, and
    build the handle with a local tokenizer. `resolve` is backend.loading's (a source -> its local folder), passed
    in so that this module does not import loading (which imports this one)."""
    t0 = time.perf_counter()
    where = sources.parse(source)
    sources.check_allowed(where)
    client = RemoteClient(where)
    try:
        listed = client.get("/models")
    except RemoteError as e:
        raise ModelLoadError(str(e)) from None
    model_id, context = _pick_model(listed, where)
    tok, folder = _tokenizer_for(tokenizer, model_id, resolve)
    cfg = _config(tok, folder, model_id, context)
    shown = source if not limits.public_mode() else f"openai+{where.scheme}://{where.address}{where.base_path}" \
        f"#{model_id}"
    return RemoteHandle(None, tok, shown, load_seconds=time.perf_counter() - t0,
                        runners={"remote": RemoteRunner(client)}, backend="remote", config=cfg)


def _pick_model(listed, where: sources.RemoteSource) -> tuple[str, int | None]:
    """(model id, context length if the server says it) from GET /v1/models."""
    data = listed.get("data") if isinstance(listed, dict) else None
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if isinstance(data, list) \
        else None
    if not models:
        raise ModelLoadError(f"the remote server at {where.address} lists no models (GET {where.base_path}/models)")
    chosen = next((m for m in models if m["id"] == where.model), None) if where.model else models[0]
    if chosen is None:
        names = ", ".join(m["id"] for m in models[:5])
        raise ModelLoadError(f"the remote server at {where.address} has no model {where.model!r}; it has: {names}")
    context = chosen.get("max_model_len")  # vLLM's field
    return chosen["id"], context if isinstance(context, int) and context > 0 else None


def _tokenizer_for(given, model_id: str, resolve):
    """(Tokenizer, the folder it came from or None)."""
    import os
    from pathlib import Path

    if isinstance(given, Tokenizer):
        return given, None
    spec = given or os.environ.get(sources.TOKENIZER_ENV) or (None if limits.public_mode() else model_id)
    if not spec:
        raise ModelLoadError("a remote model needs its tokenizer on this side: the operator sets "
                             f"{sources.TOKENIZER_ENV} to its folder or Hub id")
    try:
        folder = Path(resolve(str(spec)))
        return Tokenizer.from_folder(folder), folder
    except FornaxError as e:
        raise ModelLoadError(f"the remote model's tokenizer ({Path(str(spec)).name}) could not be loaded: {e}; set "
                             f"{sources.TOKENIZER_ENV} to the model's folder or Hub id") from None


def _config(tok: Tokenizer, folder, model_id: str, context: int | None) -> ModelConfig:
    """The model's config from the tokenizer's folder when it has one (context, end-of-sequence ids), else a
    stand-in; `name` is the server's model id (what requests name)."""
    cfg = None
    if folder is not None and (folder / "config.json").exists():
        try:
            cfg = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
        except (FornaxError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            cfg = None  # a config we cannot read: the stand-in below (the server knows its model)
    if cfg is None:
        cfg = ModelConfig(vocab_size=max(tok.vocab_size, 1), max_seq_len=context or 4096)
    cfg.name = model_id
    cfg.max_seq_len = context or cfg.max_seq_len
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    return cfg
