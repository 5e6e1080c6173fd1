"""The HTTP routes: /v1/completions (one or several prompts) and /v1/chat/completions, both with `n` choices and
SSE streaming; /v1/models, /health, vLLM's /tokenize and /detokenize, Prometheus' /metrics. A POST request is
admitted (429 when the engine holds all it admits), read within the size and time limits, checked (`protocol`),
tokenised in a worker thread (`prompts`), then added to the engine thread (`async_engine`), one engine request
per prompt; its outputs are shaped (`responses`) and sent as they come. Errors are OpenAI-style JSON; bad input
is never a 5xx."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response, StreamingResponse

from ringlinear.engine.sequence import RequestError
from ringlinear.serve import protocol as P
from ringlinear.serve import responses as R
from ringlinear.serve.async_engine import AsyncLLMEngine, EngineBusy, next_output
from ringlinear.serve.config import ServerConfig
from ringlinear.serve.guards import RequestGuard, check_json_content_type, error_response, parse_json, read_body
from ringlinear.serve.metrics import ServingMetrics
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
    max_prompts = min(P.MAX_PROMPTS, async_engine.max_admitted or P.MAX_PROMPTS)
    app.state.limits = P.Limits(cfg.served_model_name or async_engine.model_name, async_engine.max_model_len,
                                engine.config.vocab_size, engine.engine_config.max_num_seqs, max_prompts)
    app.state.prompts = PromptEncoder(engine, cfg.tokenizer_threads)
    app.state.token_text = R.TokenText(engine.tokenizer)
    app.state.metrics = ServingMetrics(async_engine)
    app.add_exception_handler(P.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
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


def _output_error(error: str) -> P.APIError:
    """A request the engine failed (its own error: the others went on)."""
    return P.APIError(500, f"the request failed in the engine: {error}", kind="internal_server_error")


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


async def _body(request: Request, parse: Callable):
    """The checked request body: JSON content type, size and time limits, then `parse(body, limits)`."""
    state = request.app.state
    check_json_content_type(request)
    cfg: ServerConfig = state.config
    return parse(parse_json(await read_body(request, cfg.max_request_body_bytes, cfg.request_body_timeout_s)),
                 state.limits)


async def _admit(request: Request, rid: str, parse: Callable, encode: Callable, prompt_texts: Callable) -> tuple:
    """Admission, body, checks, tokens and the engine's requests of a POST request: (parsed request, `Choices`,
    queue of their outputs). Each prompt is an engine request: `rid` for one, `rid-i` for several, each admitted
    (429 when the engine holds all it admits, all or none). `encode(prompts, req)` -> token ids per prompt;
    `prompt_texts(req)` -> echo text per prompt (None: no echo)."""
    state = request.app.state
    engine: AsyncLLMEngine = state.engine
    try:
        engine.reserve(rid)
    except EngineBusy as e:
        raise P.APIError(429, str(e), kind="rate_limit_error") from None
    ids: list[str] = [rid]
    added: list[str] = []
    try:
        req = await _body(request, parse)
        prompt_ids = await encode(state.prompts, req)
        if len(prompt_ids) > 1:
            ids = [f"{rid}-{i}" for i in range(len(prompt_ids))]
            try:
                engine.reserve(ids, replacing=rid)
            except EngineBusy as e:
                ids = [rid]
                raise P.APIError(429, str(e), kind="rate_limit_error") from None
        texts = prompt_texts(req, prompt_ids)
        choices = R.Choices([R.Prompt(i, t) for i, t in zip(ids, texts)], req.params.n)
        queue: asyncio.Queue = asyncio.Queue()

        async def add(i: int, rid_i: str, tokens: list[int]) -> None:
            # a copy per prompt: the engine keeps (and may set max_tokens on) the one it is given
            params = dataclasses.replace(req.params) if len(ids) > 1 else req.params
            try:
                await engine.add(rid_i, tokens, params, getattr(req, "fill_max_tokens", False), queue)
            except RequestError as e:
                field = "messages" if e.field == "prompt" and isinstance(req, P.ChatRequest) else e.field
                where = f"prompt[{i}]: " if len(ids) > 1 and e.field == "prompt" else ""
                raise P.APIError(400, where + str(e), field) from None

        added = ids
        # the adds are queued at once, so the engine thread takes them all before its next step
        await asyncio.gather(*(add(i, rid_i, tokens) for i, (rid_i, tokens) in enumerate(zip(ids, prompt_ids))))
    except BaseException:
        for rid_i in ids:  # a request added (or being added) is aborted, which also ends its admission
            if rid_i in added:
                engine.abort(rid_i)
            else:
                engine.release(rid_i)
        raise
    return req, choices, queue


def _echo_texts(engine, req: P.CompletionRequest, prompt_ids: list[list[int]]) -> list[str | None]:
    """Completions' echo: the prompt string as sent, or the text of its token ids (special tokens written)."""
    if not req.echo:
        return [None] * len(prompt_ids)
    return [p if isinstance(p, str) else ("" if engine.tokenizer is None else
                                          engine.tokenizer.decode(ids, skip_special_tokens=False))
            for p, ids in zip(req.prompts, prompt_ids)]


async def completions(request: Request):
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    engine = request.app.state.engine.engine
    req, choices, queue = await _admit(request, rid, P.parse_completion,
                                       lambda prompts, r: prompts.completions(r.prompts),
                                       lambda r, ids: _echo_texts(engine, r, ids))
    piece: R.TokenText = request.app.state.token_text
    head = {"id": rid, "object": "text_completion", "created": created, "model": request.app.state.limits.model_name}
    logprobs = req.logprobs is not None
    if req.streaming.stream:
        def chunks(i: int) -> list[dict]:
            return [{**head, "choices": [c]} for c in R.completion_deltas(piece, choices, i, req.echo, logprobs)]

        return _streaming(request, choices, queue, chunks, req.streaming, lambda u: {**head, "choices": [], "usage": u})

    await _final_outputs(request, choices, queue)
    return {**head, "choices": [R.completion_choice(piece, choices, index, i, c, req.echo, logprobs)
                                for index, i, c in choices.each()], "usage": choices.usage()}


async def chat_completions(request: Request):
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    req, choices, queue = await _admit(request, rid, P.parse_chat,
                                       lambda prompts, r: _one(prompts.chat(r.messages, r.template_kwargs)),
                                       lambda r, ids: [None])
    piece: R.TokenText = request.app.state.token_text
    head = {"id": rid, "object": "chat.completion", "created": created, "model": request.app.state.limits.model_name}
    if req.streaming.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}

        def chunks(i: int) -> list[dict]:
            return [{**chunk_head, "choices": [c]} for c in R.chat_deltas(piece, choices, req.top_logprobs)]

        return _streaming(request, choices, queue, chunks, req.streaming,
                          lambda u: {**chunk_head, "choices": [], "usage": u})

    await _final_outputs(request, choices, queue)
    return {**head, "choices": [R.chat_choice(piece, index, c, req.top_logprobs) for index, _, c in choices.each()],
            "usage": choices.usage()}


async def _one(ids) -> list[list[int]]:
    return [await ids]


async def tokenize(request: Request):
    """vLLM's /tokenize: {prompt} or {messages} -> {count, max_model_len, tokens, token_strs}."""
    req: P.TokenizeRequest = await _body(request, P.parse_tokenize)
    prompts: PromptEncoder = request.app.state.prompts
    ids = await prompts.tokenize(req)
    return {"count": len(ids), "max_model_len": request.app.state.limits.max_model_len, "tokens": ids,
            "token_strs": prompts.token_strs(ids) if req.return_token_strs else None}


async def detokenize(request: Request):
    """vLLM's /detokenize: {tokens} -> {prompt}."""
    ids = await _body(request, P.parse_detokenize)
    return {"prompt": await request.app.state.prompts.detokenize(ids)}


async def metrics(request: Request):
    return Response(await request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- sending outputs --------------------------------------------------------------------------------------
async def _final_outputs(request: Request, choices: R.Choices, queue: asyncio.Queue) -> None:
    """Wait until every prompt's request has finished (`choices.latest`); a choice the engine failed fails the
    whole request (500) and ends the others; a client that goes away first has its requests aborted (499)."""
    engine: AsyncLLMEngine = request.app.state.engine
    last_check = time.monotonic()
    try:
        while not choices.finished:
            try:
                choices.update(await asyncio.wait_for(next_output(queue), DISCONNECT_POLL_S))
                error = choices.error()
                if error is not None:
                    raise _output_error(error)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    raise P.APIError(499, "the client closed the connection")
    finally:
        for rid in choices.unfinished():
            engine.abort(rid)


def _streaming(request: Request, choices: R.Choices, queue: asyncio.Queue, chunks: Callable[[int], list],
               streaming: P.Streaming, usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
    """SSE over the requests' outputs; `chunks(prompt_index)` makes the events of that prompt's latest output. A
    failure (of the engine, or of one choice) ends the stream with an error event and [DONE]. A client that
    disconnects cancels the generator (or closes it), which aborts the requests."""
    engine: AsyncLLMEngine = request.app.state.engine

    async def events() -> AsyncIterator[str]:
        try:
            while not choices.finished:
                try:
                    i = choices.update(await next_output(queue))
                    error = choices.error()
                    if error is not None:
                        yield P.sse(_output_error(error).body())
                        break
                    # the engine only extends a choice's text (it holds back partial characters and stop prefixes)
                    events = chunks(i)
                except Exception as e:
                    yield P.sse(P.error_body(f"internal error: {type(e).__name__}: {e}", "internal_server_error"))
                    break
                for chunk in events:
                    if streaming.continuous_usage:
                        chunk["usage"] = choices.usage()
                    yield P.sse(chunk)
            else:
                if streaming.include_usage:
                    yield P.sse(usage_chunk(choices.usage()))
            yield "data: [DONE]\n\n"
        finally:
            for rid in choices.unfinished():
                engine.abort(rid)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
