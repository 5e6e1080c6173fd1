"""What a request must pass before a route handles it: the Host header allow-list (against DNS rebinding: a web
page on another name must not reach a server on this machine's loopback), the API key on the API (/v1/*,
/tokenize, /detokenize; /health and /metrics stay open for probes and scrapers, as vLLM's), a JSON
Content-Type on POST (a cross-site form cannot send one without a CORS preflight), and the body's size and
read time. Refusals are OpenAI-style JSON errors."""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ringlinear.serve.protocol import APIError


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote request text holding lone surrogates, which
    cannot be written as UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(e: APIError, headers: dict | None = None) -> ErrorResponse:
    return ErrorResponse(e.body(), status_code=e.status, headers=headers)


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1"), in lower case."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def needs_key(path: str) -> bool:
    """The API's routes: /v1/*, and /tokenize, /detokenize (they run the tokenizer and the chat template, which
    cost the server CPU; vLLM leaves them open)."""
    return path.startswith("/v1") or path in ("/tokenize", "/detokenize")


class RequestGuard:
    """ASGI middleware: the Host allow-list for every HTTP request, the API key for the API routes."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], api_key: str | None):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = set(allowed_hosts)
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if not self.any_host and host_name(headers.get("host", "")) not in self.allowed_hosts:
            error = APIError(400, "the Host header names a host this server does not answer for (set "
                                  "--allowed-hosts (server config field allowed_hosts) to allow it)")
        elif self.api_key is not None and needs_key(scope["path"]) and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode("latin-1"), self.api_key):
                error = APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
        if error is None:
            await self.app(scope, receive, send)
        else:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            await error_response(error, headers)(scope, receive, send)


def check_json_content_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"{media or 'no Content-Type'!r})")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past `limit` bytes (by its Content-Length before reading, or while
    reading a chunked body) and with 408 if it takes longer than `timeout_s` to arrive."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes, more than the limit of {limit}")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is more than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object. NaN and Infinity are read as numbers, for the fields' checks to refuse by name.
    (json.loads holds the GIL wherever it runs; the body size limit is what bounds its time.)"""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body
