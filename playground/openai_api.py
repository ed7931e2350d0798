"""An OpenAI-compatible HTTP API over the playground's model: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions, streamed (server-sent events ending in `data: [DONE]`) or not.

The loaded model and its backend answer, through the same model slot (and lock) as the UI, under the same caps
in public mode (`deployment.check_sampling`, the event time limit). Errors come back as OpenAI shapes them:
status 400 with {"error": {"message", "type", "param", "code"}}.

`server(demo)` is the FastAPI app that serves this API with the Gradio app mounted at "/"; `server(None)` serves the
API alone (`python -m playground --api-only`).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import backend
from backend import limits
from export.attach import ONNX_BACKENDS, attach_onnx

from . import deployment, prepare
from .state import current
from .tabs.chat import message_text

# Our names of the OpenAI fields, for naming the field in an error (the backend names its own parameters).
OUR_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n", "top_logprobs": "top_logprobs"}
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
# OpenAI fields we take as they are (extensions that vLLM and llama.cpp also accept: top_k, min_p, ...).
PASSED = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
          "repetition_penalty")
IGNORED = {"model", "user", "stream", "stream_options", "messages", "prompt", "logprobs", "top_logprobs", "n",
           "stop", "max_tokens", "max_completion_tokens", "backend", "logit_bias", "response_format", "metadata",
           "store", "suffix", "echo", "best_of", "parallel_tool_calls", "service_tier"}


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def from_fornax(e: backend.FornaxError) -> APIError:
    """A backend refusal as a 400 that names the OpenAI field when the message starts with one of ours."""
    message = str(e)
    first = re.match(r"\w+", message)
    word = first.group(0) if first else ""
    param = OUR_NAMES.get(word, word if word in PASSED or word == "stop" else None)
    if "context" in message and ("prompt" in message or "tokens exceed" in message):
        return APIError(message, "messages", "context_length_exceeded")
    return APIError(message, param, "limit_exceeded" if isinstance(e, limits.LimitError) else None)


def model_id(handle: backend.ModelHandle) -> str:
    """The name the API gives the loaded model: its Hub id or `default`, a folder's or file's own name."""
    source = handle.source
    return os.path.basename(source.rstrip("/\\")) if os.path.exists(source) else source


# --- requests -> backend calls ---

def field(body: dict, name: str, types: tuple, default=None):
    value = body.get(name, default)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise APIError(f"{name} has the wrong type: {type(value).__name__}", name, "invalid_type")
    return value


def sampling(body: dict, top_logprobs: int) -> dict:
    """The request's sampling fields as `h.stream` keywords (OpenAI defaults: temperature 1, top_p 1)."""
    for name, neutral in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, "")),
                          ("logit_bias", (None, {}))):
        if body.get(name) not in neutral:
            raise APIError(f"{name} is not supported by this server", name, "unsupported_parameter")
    unknown = sorted(set(body) - IGNORED - set(PASSED))
    if unknown:
        raise APIError(f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    params = {name: field(body, name, (int, float)) for name in PASSED}
    params["temperature"] = 1.0 if params["temperature"] is None else params["temperature"]
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise APIError("stop must be a string or a list of strings", "stop", "invalid_type")
    max_tokens = field(body, "max_completion_tokens", (int,)) or field(body, "max_tokens", (int,))
    n = field(body, "n", (int,), 1)
    return {**{k: v for k, v in params.items() if v is not None}, "seed": params["seed"], "stop": stop or [],
            "num_samples": n, "max_new_tokens": max_tokens, "top_logprobs": top_logprobs}


def prompt_of(body: dict, chat: bool) -> tuple[list[dict] | str | list[int], int]:
    """The messages or the prompt, and its characters (what the public prompt cap counts)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError("messages must be a non-empty list of {role, content} objects", "messages")
        out = [{"role": str(m.get("role", "")), "content": message_text(m.get("content"))} for m in messages]
        return out, sum(len(m["content"]) for m in out)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt, len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt, len(prompt)
    raise APIError("prompt must be one non-empty string (or a list of token ids); send one request per prompt",
                   "prompt")


def logprob_request(body: dict, chat: bool) -> tuple[bool, int]:
    """(report logprobs, alternatives per token): chat takes logprobs: bool + top_logprobs, completions logprobs: k."""
    if chat:
        wanted = bool(field(body, "logprobs", (bool,), False))
        k = field(body, "top_logprobs", (int,), 0) or 0
        if k and not wanted:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
        return wanted, k
    k = field(body, "logprobs", (int,))
    return k is not None, k or 0


class Run:
    """One request's generation: validated and started under the model slot's lock (so it answers 400 before any
    event is sent), released when the run ends or its client goes away."""

    def __init__(self, body: dict, chat: bool):
        self.chat = chat
        self.want_logprobs, k = logprob_request(body, chat)
        prompt, chars = prompt_of(body, chat)
        params = sampling(body, k)
        deployment.check_sampling({k: v for k, v in params.items() if v is not None}, chars)
        name = field(body, "backend", (str,))
        seconds = limits.current().event_time_limit_s
        deadline = time.monotonic() + seconds if seconds > 0 else None
        self.created, self.id = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self._slot = current.using()
        handle = self._slot.__enter__()
        try:
            self.model = model_id(handle)
            ids = handle.encode(prompt)
            if params["max_new_tokens"] is None:  # OpenAI's default: as much as the context leaves (within the cap)
                room = handle.config.max_seq_len - len(ids)
                params["max_new_tokens"] = max(1, min(room, limits.current().max_new_tokens))
            name = name or prepare.preferred(handle.info()) or handle.backend  # the prepared fast path, if any
            self.backend = name
            if name in ONNX_BACKENDS and name not in handle.runners:
                attach_onnx(handle, ONNX_BACKENDS[name])
            self.stream = handle.stream(ids, backend=name, should_stop=lambda: deadline and time.monotonic() > deadline,
                                        **params)
        except BaseException:
            self._slot.__exit__(None, None, None)
            raise
        self.n = params["num_samples"]

    def close(self):
        try:
            self.stream.close()
        finally:
            if self._slot is not None:
                slot, self._slot = self._slot, None
                slot.__exit__(None, None, None)

    def run(self) -> backend.GenerationResult:
        try:
            for _ in self.stream:
                pass
            return self.stream.result
        finally:
            self.close()

    # --- responses ---
    def head(self, obj: str) -> dict:
        # system_fingerprint names the execution path that answered (OpenAI: "the backend configuration")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": f"fornax-{self.backend}"}

    def logprobs(self, completion: backend.generate.Completion, text_offset: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        tokens = completion.tokens
        if self.chat:
            def entry(text, lp):
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
                                for t in tokens]}
        offsets, at = [], text_offset
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{s: lp for _, s, lp in t.top} for t in tokens], "text_offset": offsets}

    def body(self, result: backend.GenerationResult) -> dict:
        choices = []
        for i, c in enumerate(result.completions):
            choice = {"index": i, "finish_reason": FINISH[c.finish_reason], "logprobs": self.logprobs(c)}
            choice.update({"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text})
            choices.append(choice)
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(result)}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, logprobs=None,
              role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return sse({**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]})

    def events(self, include_usage: bool):
        """Server-sent events: a role chunk per choice (chat), text deltas as they come, then per choice its
        finish reason (with its logprobs: tokens and text deltas do not line up while stop strings are held back),
        the usage if asked, and [DONE]."""
        try:
            if self.chat:
                for i in range(self.n):
                    yield self.chunk(i, role=True)
            for delta in self.stream:
                yield self.chunk(delta.index, delta.text)
            result = self.stream.result
            for i, c in enumerate(result.completions):
                yield self.chunk(i, None if self.chat else "", FINISH[c.finish_reason], self.logprobs(c))
            if include_usage:
                yield sse({**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                           "usage": usage(result)})
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def usage(result: backend.GenerationResult) -> dict:
    t = result.timings
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.new_tokens,
            "total_tokens": t.prompt_tokens + t.new_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def answer(request: Request, chat: bool):
    try:
        try:
            body = await request.json()
        except ValueError:
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        stream = bool(field(body, "stream", (bool,), False))
        try:
            run = await run_in_threadpool(Run, body, chat)
            if not stream:
                return JSONResponse(run.body(await run_in_threadpool(run.run)))
        except backend.FornaxError as e:
            raise from_fornax(e) from None
    except APIError as e:
        return e.response()
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(pull(run.events(include_usage)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def pull(events):
    """A sync generator's items, each computed on a worker thread; closed (releasing the model) however the
    response ends, a client that went away included."""
    done = object()
    try:
        while (item := await run_in_threadpool(next, events, done)) is not done:
            yield item
    except backend.FornaxError as e:  # mid-stream: headers are sent, so the error goes in the stream
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)


def routes(app: FastAPI) -> FastAPI:
    @app.get("/v1/models")
    def models():
        handle = current.handle
        data = [] if handle is None else [{"id": model_id(handle), "object": "model", "created": 0,
                                           "owned_by": "fornax", "backends": handle.backends()}]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    return app


def server(demo=None) -> FastAPI:
    """The API, with the Gradio app `demo` mounted at "/" beside it when given (one server, one model slot)."""
    app = routes(FastAPI(title="Fornax OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None))
    if demo is None:
        return app
    import gradio as gr

    from .ui import launch_options

    options = {k: v for k, v in launch_options().items() if k != "share"}
    return gr.mount_gradio_app(app, demo, path="", **options)
