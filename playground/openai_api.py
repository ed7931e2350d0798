"""An OpenAI-compatible HTTP API over the playground's model: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions, streamed (server-sent events ending in `data: [DONE]`) or not.

The loaded model and its backend answer, through the same model slot (and lock) as the UI, under the same caps
in public mode (`deployment.check_sampling`, the event time limit). Errors come back as OpenAI shapes them:
status 400 with {"error": {"message", "type", "param", "code"}}.

No request parks a worker thread while it waits: a request waits for the model slot on the event loop (up to the
event time limit, or until its client goes away); one visitor (its signed cookie) or address may have only its share
of requests waiting or running (`max_queued_per_session` / `_per_address`, as in the Gradio queue; past it: 429);
and a streamed answer whose client stops reading for `stream_send_timeout_s` is closed, which ends its generation
and frees the slot. `/v1/models` never waits for the model.

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
from backend.budget import Deadline, TimeBudgetError
from export.attach import ONNX_BACKENDS, attach_onnx

from . import deployment, hardening, prepare
from .state import current
from .tabs.chat import message_text

# Our names of the OpenAI fields, for naming the field in an error (the backend names its own parameters).
OUR_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n", "top_logprobs": "top_logprobs"}
# "time": the deployment's time limit ended the run (a streamed answer keeps its text, like a length cut-off)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "time": "length"}
LOCAL_MODEL_ID = "local-model"   # a model loaded from a server path, as public mode names it
SLOT_POLL_S = (0.005, 0.1)        # first and longest pause between looks at a busy model slot
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
    if isinstance(e, TimeBudgetError):
        return APIError(message, None, "time_limit_exceeded")
    first = re.match(r"\w+", message)
    word = first.group(0) if first else ""
    param = OUR_NAMES.get(word, word if word in PASSED or word == "stop" else None)
    if "context" in message and ("prompt" in message or "tokens exceed" in message):
        return APIError(message, "messages", "context_length_exceeded")
    return APIError(message, param, "limit_exceeded" if isinstance(e, limits.LimitError) else None)


def model_id(handle: backend.ModelHandle) -> str:
    """The name the API gives the loaded model: its Hub id or `default`, a folder's or file's own name (in public
    mode `local-model`: a server path's last part can be another visitor's file name)."""
    source = handle.source
    if not os.path.exists(source):
        return source
    return LOCAL_MODEL_ID if limits.public_mode() else os.path.basename(source.rstrip("/\\"))


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


def content_of(message: dict) -> str:
    """A message's text: a string, or a list of {"type": "text", "text"} parts (other parts carry no text)."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return message_text(content)
    raise APIError("a message's content must be a string or a list of {type, text} parts", "messages",
                   "invalid_type")


def chat_messages(body: dict) -> tuple[list[dict], int]:
    """The messages as {role, content}, counted and checked against the caps before any text is joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError("messages must be a non-empty list of {role, content} objects", "messages")
    caps = limits.current()
    limits.check(len(messages), caps.max_chat_messages, "the number of messages")
    for m in messages:
        role = m.get("role", "")
        if not isinstance(role, str):
            raise APIError("a message's role must be a string", "messages", "invalid_type")
        limits.check(len(role), caps.max_role_chars, "a message's role length in characters")
    out = [{"role": m.get("role", ""), "content": content_of(m)} for m in messages]
    return out, sum(len(m["content"]) for m in out)


def prompt_of(body: dict, chat: bool) -> tuple[list[dict] | str | list[int], int]:
    """The messages or the prompt, and its characters (what the public prompt cap counts)."""
    if chat:
        return chat_messages(body)
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
    """One request's generation. Made from the body alone (fields and caps checked, the time limit started), then
    `hold_model` waits for the model slot without a worker thread and `start` starts the stream holding it (so a
    refusal is a 400 before any event is sent); the slot is released when the run ends or its client goes away."""

    def __init__(self, body: dict, chat: bool):
        self.chat = chat
        self.want_logprobs, k = logprob_request(body, chat)
        self.prompt, chars = prompt_of(body, chat)
        self.params = sampling(body, k)
        deployment.check_sampling({k: v for k, v in self.params.items() if v is not None}, chars)
        self.requested_backend = field(body, "backend", (str,))
        self.streamed = bool(field(body, "stream", (bool,), False))
        self.include_usage = stream_usage(body)
        self.deadline = Deadline.for_event("this API request")
        self.created, self.id = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.n = self.params["num_samples"]
        self.stream: backend.Stream | None = None
        self._held = False
        self.ticket: hardening.Ticket | None = None  # its place in its visitor's and address's shares (see close)

    async def hold_model(self, gone=None) -> None:
        """Wait for the model slot on the event loop, looking again after a growing pause, until the time limit or
        until `gone()` (an async check) says the client went away (its place in the share is then given back)."""
        pause = SLOT_POLL_S[0]
        while not current.try_hold():
            if gone is not None and await gone():
                raise APIError("the client closed the connection while it waited for the model", None,
                               "client_closed", 499)
            if self.deadline.expired:
                raise APIError(f"the model stayed busy past this deployment's time limit of "
                               f"{self.deadline.seconds:g} s; try again later", None, "model_busy", 503,
                               "server_error")
            await anyio.sleep(min(pause, self.deadline.remaining()))
            pause = min(2 * pause, SLOT_POLL_S[1])
        self._held = True

    def start(self) -> None:
        """Encode the prompt and open the stream on the held slot (released again if anything fails)."""
        try:
            handle = current.handle
            if handle is None:
                raise backend.GenerationError("no model is loaded: load one in the Model tab first")
            self.model = model_id(handle)
            ids = handle.encode(self.prompt)
            params = dict(self.params)
            if params["max_new_tokens"] is None:  # OpenAI's default: as much as the context leaves (within the cap)
                room = handle.config.max_seq_len - len(ids)
                params["max_new_tokens"] = max(1, min(room, limits.current().max_new_tokens))
            self.backend = self.runner_for(handle)
            self.stream = handle.stream(ids, backend=self.backend, deadline=self.deadline, **params)
        except BaseException:
            self.close()
            raise

    def runner_for(self, handle: backend.ModelHandle) -> str:
        """The backend asked for, else the prepared fast path, else the handle's own. Public mode runs only the
        prepared ones: preparing another compiles or exports the model, which no visitor may start from here."""
        name = self.requested_backend or prepare.preferred(handle.info()) or handle.backend
        if name in handle.runners:
            return name
        if limits.public_mode():
            raise APIError(f"backend {name!r} is not prepared on this public deployment; prepared: "
                           f"{', '.join(handle.runners)}", "backend", "backend_not_prepared")
        if name in ONNX_BACKENDS:
            attach_onnx(handle, ONNX_BACKENDS[name])
        return name  # an unknown name is the backend's to reject, naming the ones it has

    def close(self):
        try:
            if self.stream is not None:
                self.stream.close()
        finally:
            try:
                if self._held:
                    self._held = False
                    current.release()
            finally:
                if self.ticket is not None:
                    self.ticket.release()

    def run(self) -> backend.GenerationResult:
        """The whole answer, or TimeBudgetError when the time limit cut it short (a non-streamed answer has no
        way to say it is partial)."""
        try:
            for _ in self.stream:
                pass
            result = self.stream.result
        finally:
            self.close()
        if any(c.finish_reason == "time" for c in result.completions):
            raise TimeBudgetError(f"{self.deadline.what} ran past this deployment's time limit of "
                                  f"{self.deadline.seconds:g} s and was stopped; ask for fewer tokens")
        return result

    # --- responses ---
    def head(self, obj: str) -> dict:
        # system_fingerprint names the execution path that answered (OpenAI: "the backend configuration")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": f"fornax-{self.backend}"}

    def logprobs(self, completion: backend.generation.generate.Completion, text_offset: int = 0) -> dict | None:
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

    def events(self):
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
            if self.include_usage:
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


def stream_usage(body: dict) -> bool:
    """stream_options.include_usage (checked before the model is taken: a bad value must not hold it)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError("stream_options must be an object like {\"include_usage\": true}", "stream_options",
                       "invalid_type")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise APIError("stream_options.include_usage must be true or false", "stream_options", "invalid_type")
    return include


async def request_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise APIError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def admission(request: Request) -> hardening.Ticket:
    """This request's place in its visitor's and its address's share, or a 429 (before its body is read)."""
    vid = deployment.visitor_id(request)
    taken = hardening.admit_api_request(request, vid if vid.startswith("v:") else None)
    if isinstance(taken, str):
        raise APIError(taken, None, "rate_limit_exceeded", 429, "requests")
    return taken


async def answer(request: Request, chat: bool):
    try:
        ticket = admission(request)
    except APIError as e:
        return e.response()
    streaming = False
    try:
        run = Run(await request_body(request), chat)
        run.ticket = ticket
        await run.hold_model(request.is_disconnected)
        try:
            with anyio.CancelScope(shield=True):  # a slot taken is a slot released, whatever happens to the request
                await run_in_threadpool(run.start)
        except BaseException:
            run.close()
            raise
        if not run.streamed:
            return JSONResponse(run.body(await run_in_threadpool(run.run)))
        streaming = True  # from here the stream's end gives the ticket back (Run.close)
        return BackpressuredStream(pull(run.events()), on_close=run.close, media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except backend.FornaxError as e:
        return from_fornax(e).response()
    except APIError as e:
        return e.response()
    finally:
        if not streaming:  # refused, answered, failed or cancelled (a client gone while it waited)
            ticket.release()


class BackpressuredStream(StreamingResponse):
    """Server-sent events whose client must keep reading: a chunk that cannot be handed to the connection within
    `stream_send_timeout_s` (its buffers are full: the client stopped reading) ends the response, which closes the
    generation and releases the model slot. Without this a client that never reads holds the model forever.
    `on_close` runs however the response ends, even before its first chunk was pulled (then closing the events
    generator runs none of its own clean-up)."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        seconds = limits.current().stream_send_timeout_s

        async def timed_send(message):
            with anyio.fail_after(seconds if seconds > 0 else None):
                await send(message)

        try:
            await super().stream_response(timed_send)
        except TimeoutError:
            pass  # the connection is dropped: the response stays incomplete, as the client will see
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                if self.on_close is not None:
                    await run_in_threadpool(self.on_close)


async def pull(events):
    """A sync generator's items, each computed on a worker thread (none waits while the client reads); closed
    (releasing the model) however the response ends, a client that went away or stopped reading included."""
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
    async def models():  # on the event loop, never on the model lock: it answers while the model is busy
        handle = current.handle
        if handle is None:
            return {"object": "list", "data": []}
        backends = list(handle.runners) if limits.public_mode() else handle.runner_names()
        return {"object": "list", "data": [{"id": model_id(handle), "object": "model", "created": 0,
                                            "owned_by": "fornax", "backends": backends}]}

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
    app.add_middleware(hardening.BodyCap)  # /v1 too (public mode); Gradio's own routes have it from launch_options
    if demo is None:
        return app
    import gradio as gr

    from .ui import launch_options

    options = {k: v for k, v in launch_options().items() if k != "share"}
    return gr.mount_gradio_app(app, demo, path="", **options)
