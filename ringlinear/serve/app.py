"""The HTTP routes: /v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models, /health.
A POST request is admitted (429 when the engine holds all it admits), read within the size and time limits,
checked (`protocol`), tokenised in a worker thread (`prompts`), then added to the engine thread
(`async_engine`); its outputs are sent as they come. Errors are OpenAI-style JSON; bad input is never a 5xx."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import StreamingResponse

from ringlinear.engine.sequence import RequestError, RequestOutput
from ringlinear.serve import protocol as P
from ringlinear.serve.async_engine import AsyncLLMEngine, EngineBusy, next_output
from ringlinear.serve.config import ServerConfig
from ringlinear.serve.guards import RequestGuard, check_json_content_type, error_response, parse_json, read_body
from ringlinear.serve.prompts import PromptEncoder

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


def build_app(async_engine: AsyncLLMEngine, server_config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over a running `AsyncLLMEngine`. Its state: engine, config, limits (what request checks
    need to know), prompts (the tokeniser pool), token_text (logprob token texts)."""
    cfg = server_config or ServerConfig()
    app = FastAPI(title="ringlinear", docs_url=None, redoc_url=None, openapi_url=None)
    engine = async_engine.engine
    app.state.engine = async_engine
    app.state.config = cfg
    app.state.limits = P.Limits(cfg.served_model_name or async_engine.model_name, async_engine.max_model_len,
                                engine.config.vocab_size)
    app.state.prompts = PromptEncoder(engine, cfg.tokenizer_threads)
    app.state.token_text = P.TokenText(engine.tokenizer)
    app.add_exception_handler(P.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_middleware(RequestGuard, allowed_hosts=cfg.host_allow_list(), api_key=cfg.api_key)
    if cfg.cors_allow_origins:  # added last: outermost, so preflights and refusals carry the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


# ---- errors -----------------------------------------------------------------------------------------------
async def _api_error(request: Request, e: P.APIError):
    return error_response(e)


async def _validation_error(request: Request, e: RequestValidationError):
    errs = e.errors()
    loc = [str(x) for x in errs[0].get("loc", ()) if x != "body"] if errs else []
    return error_response(P.APIError(400, errs[0].get("msg", "invalid request") if errs else "invalid request",
                                     ".".join(loc) or None))


async def _http_error(request: Request, e: StarletteHTTPException):
    return error_response(P.APIError(e.status_code, str(e.detail)), getattr(e, "headers", None))


async def _internal_error(request: Request, e: Exception):
    return error_response(P.APIError(500, f"internal error: {type(e).__name__}: {e}", kind="internal_server_error"))


def _output_error(out: RequestOutput) -> P.APIError:
    """A request the engine finished with an error (its own: the others went on)."""
    return P.APIError(500, f"the request failed in the engine: {out.error}", kind="internal_server_error")


# ---- routes -----------------------------------------------------------------------------------------------
async def health(request: Request):
    if not request.app.state.engine.alive:
        return error_response(P.APIError(503, "the engine thread is not running", kind="service_unavailable"))
    return {"status": "ok"}


async def models(request: Request):
    limits: P.Limits = request.app.state.limits
    return {"object": "list", "data": [{
        "id": limits.model_name, "object": "model", "created": int(time.time()), "owned_by": "ringlinear",
        "root": limits.model_name, "max_model_len": limits.max_model_len,
    }]}


async def _admit(request: Request, rid: str, parse: Callable, encode: Callable) -> tuple:
    """Admission, body, checks, tokens and the engine's queue of a POST request: (parsed request, queue)."""
    state = request.app.state
    check_json_content_type(request)
    try:
        state.engine.reserve(rid)
    except EngineBusy as e:
        raise P.APIError(429, str(e), kind="rate_limit_error") from None
    try:
        cfg: ServerConfig = state.config
        body = parse_json(await read_body(request, cfg.max_request_body_bytes, cfg.request_body_timeout_s))
        req = parse(body, state.limits)
        ids = await encode(state.prompts, req)
        try:
            queue = await state.engine.add(rid, ids, req.params, getattr(req, "fill_max_tokens", False))
        except RequestError as e:
            field = "messages" if e.field == "prompt" and isinstance(req, P.ChatRequest) else e.field
            raise P.APIError(400, str(e), field) from None
    except BaseException:
        state.engine.release(rid)
        raise
    return req, queue


async def completions(request: Request):
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    req, queue = await _admit(request, rid, P.parse_completion, lambda prompts, r: prompts.completion(r.prompt))
    piece = request.app.state.token_text
    head = {"id": rid, "object": "text_completion", "created": created, "model": request.app.state.limits.model_name}
    if req.stream:
        offset = [0]

        def chunks(out: RequestOutput, delta: str, first: int) -> list[dict]:
            c = out.outputs[0]
            if not (delta or out.finished or (c.logprobs is not None and len(c.token_ids) > first)):
                return []
            lp = None
            if c.logprobs is not None:
                lp, offset[0] = P.completion_logprobs(piece, c.token_ids[first:], P.chosen_logprobs(c, first),
                                                      offset[0])
            return [{**head, "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                          "finish_reason": c.finish_reason if out.finished else None}]}]

        return _streaming(request, rid, queue, chunks, req.include_usage, lambda u: {**head, "choices": [], "usage": u})

    out = await _final_output(request, rid, queue)
    c = out.outputs[0]
    lp = None if c.logprobs is None else P.completion_logprobs(piece, c.token_ids, P.chosen_logprobs(c), 0)[0]
    return {**head, "choices": [{"index": 0, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}],
            "usage": P.usage(out)}


async def chat_completions(request: Request):
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    req, queue = await _admit(request, rid, P.parse_chat,
                              lambda prompts, r: prompts.chat(r.messages, r.template_kwargs))
    piece = request.app.state.token_text
    head = {"id": rid, "object": "chat.completion", "created": created, "model": request.app.state.limits.model_name}

    def lp(out: RequestOutput, first: int):
        c = out.outputs[0]
        return None if c.logprobs is None else P.chat_logprobs(piece, c.token_ids[first:], P.chosen_logprobs(c, first))

    if req.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        started = [False]

        def chunks(out: RequestOutput, delta: str, first: int) -> list[dict]:
            events = []
            if not started[0]:
                started[0] = True
                events.append({**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
            c = out.outputs[0]
            if delta or out.finished or (c.logprobs is not None and len(c.token_ids) > first):
                events.append({**chunk_head, "choices": [{
                    "index": 0, "delta": {"content": delta} if delta else {}, "logprobs": lp(out, first),
                    "finish_reason": c.finish_reason if out.finished else None}]})
            return events

        return _streaming(request, rid, queue, chunks, req.include_usage,
                          lambda u: {**chunk_head, "choices": [], "usage": u})

    out = await _final_output(request, rid, queue)
    c = out.outputs[0]
    return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": lp(out, 0), "finish_reason": c.finish_reason}], "usage": P.usage(out)}


# ---- sending outputs --------------------------------------------------------------------------------------
async def _final_output(request: Request, rid: str, queue: asyncio.Queue) -> RequestOutput:
    """The finished output; a client that goes away first has its request aborted (499)."""
    engine: AsyncLLMEngine = request.app.state.engine
    done, last_check = False, time.monotonic()
    try:
        while True:
            try:
                out = await asyncio.wait_for(next_output(queue), DISCONNECT_POLL_S)
                if out.finished:
                    done = True
                    if out.error is not None:
                        raise _output_error(out)
                    return out
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    raise P.APIError(499, "the client closed the connection")
    finally:
        if not done:
            engine.abort(rid)


def _streaming(request: Request, rid: str, queue: asyncio.Queue, chunks: Callable[[RequestOutput, str, int], list],
               include_usage: bool, usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
    """SSE over the request's outputs; `chunks(out, text_delta, first_new_token)` makes the events. A failure ends
    the stream with an error event and [DONE]. A client that disconnects cancels the generator (or closes it),
    which aborts the request."""
    engine: AsyncLLMEngine = request.app.state.engine

    async def events() -> AsyncIterator[str]:
        sent_text, sent_tokens, done, out = "", 0, False, None
        try:
            while not done:
                try:
                    out = await next_output(queue)
                except Exception as e:
                    yield P.sse(P.error_body(f"internal error: {type(e).__name__}: {e}", "internal_server_error"))
                    done = True
                    break
                if out.finished and out.error is not None:
                    yield P.sse(_output_error(out).body())
                    done = True
                    break
                # the engine only extends a request's text (it holds back partial characters and stop prefixes)
                c = out.outputs[0]
                for chunk in chunks(out, c.text[len(sent_text):], sent_tokens):
                    yield P.sse(chunk)
                sent_text, sent_tokens, done = c.text, len(c.token_ids), out.finished
            if include_usage and out is not None and out.finished and out.error is None:
                yield P.sse(usage_chunk(P.usage(out)))
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                engine.abort(rid)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
