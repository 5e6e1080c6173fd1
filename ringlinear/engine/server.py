"""OpenAI-compatible HTTP server over `LLMEngine`: /v1/completions and /v1/chat/completions (both with SSE
streaming), /v1/models, /health. One background thread owns the engine (`AsyncLLMEngine`) and steps it while
there is work; each request reads its cumulative outputs from an asyncio.Queue and sends the text deltas."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringlinear.engine.sequence import RequestError, RequestOutput, SamplingParams

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


# ---- the engine thread ------------------------------------------------------------------------------
class AsyncLLMEngine:
    """Owns an `LLMEngine` (not thread-safe) from one background thread. Calls from the asyncio side are
    queued to that thread (`call`); the thread runs them between steps, steps while requests are unfinished and
    sleeps on a condition otherwise. Outputs go to each request's asyncio.Queue via `call_soon_threadsafe`."""

    def __init__(self, engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._calls: collections.deque = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ringlinear-engine", daemon=True)
        self._thread.start()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread (before its next step); the future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    async def add(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                  fill_max_tokens: bool = False) -> asyncio.Queue:
        """Add a request; returns the queue that receives its cumulative `RequestOutput`s (the last one has
        `finished`), or an exception if the engine fails. `fill_max_tokens`: max_tokens = what the context has
        left after the prompt. Raises `RequestError` for a request the engine refuses."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def add():
            ids = self.engine.encode(prompt) if isinstance(prompt, str) else prompt
            if fill_max_tokens:
                if len(ids) >= self.engine.max_model_len:
                    raise RequestError("prompt", f"{len(ids)} prompt tokens leave no room to generate within the "
                                                 f"maximum length {self.engine.max_model_len}")
                params.max_tokens = max(1, self.engine.max_model_len - len(ids))
            self.engine.add_request(request_id, ids, params)
            self._streams[request_id] = (loop, queue)

        try:
            await asyncio.wrap_future(self.call(add))
        except asyncio.CancelledError:
            self.abort(request_id)  # the add may have run before the cancellation reached it
            raise
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request (frees its cache); safe to call from any thread, for unknown or finished ids too."""
        def abort():
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        try:
            self.call(abort)
        except RuntimeError:
            pass  # shut down: nothing left to free

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._calls or self._busy or self._stopping):
                    self._cv.wait()
                calls, self._calls = self._calls, collections.deque()
                stopping = self._stopping
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            if stopping:
                for rid in list(self._streams):
                    self._fail(rid, RuntimeError("the engine was shut down"))
                return
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails the running requests, not the thread
                traceback.print_exc(file=sys.stderr)
                for rid in list(self._streams):
                    self._fail(rid, e)
                outputs = []
            for out in outputs:
                self._deliver(out)
            self._busy = self.engine.has_unfinished_requests()

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: nobody will read this request
            self._streams.pop(out.request_id, None)
            self.engine.abort_request(out.request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        loop, queue = self._streams.pop(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            pass
        try:
            loop.call_soon_threadsafe(queue.put_nowait, error)
        except RuntimeError:
            pass


async def _next_output(queue: asyncio.Queue) -> RequestOutput:
    out = await queue.get()
    if isinstance(out, BaseException):
        raise out
    return out


# ---- errors and request fields ----------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("a boolean", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "object": ("an object", lambda v: isinstance(v, dict)),
}


def _field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """`body[name]` checked against `kind`; absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    what, ok = _KINDS[kind]
    if not ok(value):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name)
    return value


# fields of the OpenAI API this server does not implement: refused unless they hold their neutral value
_UNSUPPORTED = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "logit_bias": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v is None,
    "min_tokens": lambda v: v in (None, 0),
    "use_beam_search": lambda v: not v,
    "tools": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _sampling_params(body: dict, max_tokens: int, logprobs: bool) -> SamplingParams:
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got n={n}", "n")
    for name, neutral in _UNSUPPORTED.items():
        if not neutral(body.get(name)):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop == []:
        stop = None
    try:
        return SamplingParams(
            temperature=_field(body, "temperature", "number", 1.0),
            top_p=_field(body, "top_p", "number", 1.0),
            top_k=_field(body, "top_k", "int", 0),
            seed=_field(body, "seed", "int", None),
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=_field(body, "stop_token_ids", "list", None) or None,
            ignore_eos=_field(body, "ignore_eos", "bool", False),
            logprobs=logprobs,
        )
    except RequestError as e:
        raise APIError(400, str(e), e.field) from None


def _stream_options(body: dict, stream: bool) -> bool:
    """Whether a streamed response ends with a usage chunk (`stream_options.include_usage`)."""
    opts = _field(body, "stream_options", "object", None)
    if opts is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with stream=true", "stream_options")
    return bool(_field(opts, "include_usage", "bool", False))


def _completion_prompt(prompt: Any) -> str | list[int]:
    """A string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt")
    raise APIError(400, "'prompt' must be a string, a list of token ids, or a list holding one of those", "prompt")


def _chat_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{role, content: str}] (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


# ---- responses --------------------------------------------------------------------------------------
def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(out: RequestOutput) -> dict:
    p, c = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text_delta(text: str, sent: str) -> str:
    # The engine only extends a request's text (it holds back partial characters and stop-string prefixes).
    return text[len(sent):]


class _TokenText:
    """The text of single tokens, for logprobs (special tokens included)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(piece: _TokenText, ids: list[int], logprobs: list[float], offset: int) -> tuple[dict, int]:
    """OpenAI completion logprobs of the chosen tokens (no alternatives: top_logprobs is null); text offsets
    count the tokens' own texts from `offset`. Returns it and the offset after the last token."""
    tokens = [piece(t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}, offset


def _chat_logprobs(piece: _TokenText, ids: list[int], logprobs: list[float]) -> dict:
    content = []
    for t, lp in zip(ids, logprobs):
        s = piece(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


# ---- the app ----------------------------------------------------------------------------------------
def build_app(async_engine: AsyncLLMEngine) -> FastAPI:
    app = FastAPI(title="ringlinear", docs_url=None, redoc_url=None)
    app.state.engine = async_engine
    model_name = async_engine.model_name
    piece = _TokenText(async_engine.engine.tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        loc = [str(x) for x in errs[0].get("loc", ()) if x != "body"] if errs else []
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return _error(400, msg, ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), None)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", None, "internal_server_error")

    def check_model(body: dict) -> None:
        name = _field(body, "model", "str", None)
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here (this server serves {model_name!r})", "model")

    async def add(rid: str, prompt, params: SamplingParams, field: str, fill_max_tokens: bool = False):
        try:
            return await async_engine.add(rid, prompt, params, fill_max_tokens)
        except RequestError as e:
            raise APIError(400, str(e), field if e.field == "prompt" else e.field) from None

    async def final_output(rid: str, queue: asyncio.Queue, request: Request) -> RequestOutput | None:
        """The finished output, or None if the client went away first (the request is then aborted)."""
        done, last_check = False, time.monotonic()
        try:
            while True:
                try:
                    out = await asyncio.wait_for(_next_output(queue), DISCONNECT_POLL_S)
                    if out.finished:
                        done = True
                        return out
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        return None
        finally:
            if not done:
                async_engine.abort(rid)

    def streaming(rid: str, queue: asyncio.Queue, chunks: Callable[[RequestOutput, str, int], list[dict]],
                  include_usage: bool, usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
        """SSE over the request's outputs; `chunks(out, text_delta, first_new_token)` makes the events. A client
        that disconnects cancels the generator (or closes it), which aborts the request."""

        async def events() -> AsyncIterator[str]:
            sent_text, sent_tokens, done, out = "", 0, False, None
            try:
                while not done:
                    try:
                        out = await _next_output(queue)
                    except Exception as e:
                        yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                              "type": "internal_server_error", "param": None, "code": None}})
                        done = True
                        break
                    delta = _text_delta(out.text, sent_text)
                    for chunk in chunks(out, delta, sent_tokens):
                        yield _sse(chunk)
                    sent_text, sent_tokens, done = out.text, len(out.token_ids), out.finished
                if include_usage and out is not None and out.finished:
                    yield _sse(usage_chunk(_usage(out)))
                yield "data: [DONE]\n\n"
            finally:
                if not done:
                    async_engine.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()), "owned_by": "ringlinear",
            "root": model_name, "max_model_len": async_engine.max_model_len,
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        check_model(body)
        prompt = _completion_prompt(body.get("prompt"))
        if _field(body, "echo", "bool", False):
            raise APIError(400, "'echo' is not supported", "echo")
        logprobs = _field(body, "logprobs", "int", None)
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise APIError(400, f"'logprobs' must be in [0, 20], got {logprobs}", "logprobs")
        stream = _field(body, "stream", "bool", False)
        include_usage = _stream_options(body, stream)
        params = _sampling_params(body, _field(body, "max_tokens", "int", 16), logprobs is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        queue = await add(rid, prompt, params, "prompt")

        if stream:
            offset = [0]

            def chunks(out: RequestOutput, delta: str, first: int) -> list[dict]:
                if not (delta or out.finished or (out.logprobs is not None and len(out.token_ids) > first)):
                    return []
                lp = None
                if out.logprobs is not None:
                    lp, offset[0] = _completion_logprobs(piece, out.token_ids[first:], out.logprobs[first:], offset[0])
                return [{**head, "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                              "finish_reason": out.finish_reason if out.finished else None}]}]

            return streaming(rid, queue, chunks, include_usage, lambda u: {**head, "choices": [], "usage": u})

        out = await final_output(rid, queue, request)
        if out is None:
            return _error(499, "the client closed the connection")
        lp = None if out.logprobs is None else _completion_logprobs(piece, out.token_ids, out.logprobs, 0)[0]
        return {**head, "choices": [{"index": 0, "text": out.text, "logprobs": lp,
                                     "finish_reason": out.finish_reason}], "usage": _usage(out)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        check_model(body)
        messages = _chat_messages(body.get("messages"))
        logprobs = _field(body, "logprobs", "bool", False)
        if _field(body, "top_logprobs", "int", 0) != 0:
            raise APIError(400, "'top_logprobs' is not supported (only 0): the chosen tokens' logprobs are returned "
                                "with logprobs=true", "top_logprobs")
        stream = _field(body, "stream", "bool", False)
        include_usage = _stream_options(body, stream)
        max_tokens = _field(body, "max_completion_tokens", "int", None)
        max_tokens = _field(body, "max_tokens", "int", max_tokens)
        try:
            params = _sampling_params(body, 1 if max_tokens is None else max_tokens, logprobs)
        except APIError as e:
            if e.param == "max_tokens" and body.get("max_tokens") is None:
                e.param = "max_completion_tokens"
            raise
        try:
            prompt = async_engine.engine.apply_chat_template(messages)
        except RequestError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # the checkpoint's template refused these messages
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": model_name}
        queue = await add(rid, prompt, params, "messages", fill_max_tokens=max_tokens is None)

        def lp(out: RequestOutput, first: int):
            return None if out.logprobs is None else _chat_logprobs(piece, out.token_ids[first:], out.logprobs[first:])

        if stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            started = [False]

            def chunks(out: RequestOutput, delta: str, first: int) -> list[dict]:
                events = []
                if not started[0]:
                    started[0] = True
                    events.append({**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]})
                if delta or out.finished or (out.logprobs is not None and len(out.token_ids) > first):
                    events.append({**chunk_head, "choices": [{
                        "index": 0, "delta": {"content": delta} if delta else {}, "logprobs": lp(out, first),
                        "finish_reason": out.finish_reason if out.finished else None}]})
                return events

            return streaming(rid, queue, chunks, include_usage, lambda u: {**chunk_head, "choices": [], "usage": u})

        out = await final_output(rid, queue, request)
        if out is None:
            return _error(499, "the client closed the connection")
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                     "logprobs": lp(out, 0), "finish_reason": out.finish_reason}],
                "usage": _usage(out)}

    return app


# ---- `ringlinear serve` -----------------------------------------------------------------------------
def serve(engine_config, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the checkpoint of `engine_config` (an `EngineConfig`) into an engine and serve it with uvicorn until
    interrupted."""
    from ringlinear.engine.llm import LLMEngine

    engine = LLMEngine(engine_config)
    async_engine = AsyncLLMEngine(engine)
    try:
        app = build_app(async_engine)
        print(f"serving {engine.model_name} (max_model_len {engine.max_model_len}) at "
              f"http://{host}:{port}/v1", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        async_engine.shutdown()
