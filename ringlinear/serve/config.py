"""`ServerConfig`: how the HTTP server listens and what it lets in (authentication, allowed hosts and origins,
size, count and time limits). The engine's own settings are `EngineConfig`'s."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on. A loopback address keeps the server on this machine; 0.0.0.0 opens it to the network."""
    port: int = 8000
    """TCP port to listen on (0: any free port)."""
    served_model_name: str | None = None
    """The model name clients send and see in /v1/models (default: the checkpoint directory's name)."""
    api_key: str | None = None
    """When set, /v1/* requires the header `Authorization: Bearer <api_key>` (401 otherwise); /health stays open."""
    allowed_hosts: list[str] | None = None
    """Host header values accepted (the port is ignored; "*" accepts any), a defence against DNS rebinding. Default:
    the loopback names when `host` is a loopback address, else any."""
    cors_allow_origins: list[str] = field(default_factory=list)
    """Origins whose web pages may call the API from a browser (CORS; "*" for any). Empty: none (CORS off)."""
    max_request_body_bytes: int = 8 * 2**20
    """Largest request body accepted (413 above)."""
    request_body_timeout_s: float = 30.0
    """Longest time a client may take to send its request body (408 after)."""
    max_waiting_requests: int = 256
    """Requests that may wait beyond the engine's max_num_seqs running ones; more are refused with 429."""
    request_timeout_s: float | None = 600.0
    """Longest time a request may stay in the engine (waiting and generating); it then finishes with
    finish_reason "length" and frees its slot. None: no limit."""
    keep_alive_timeout_s: float = 5.0
    """An idle keep-alive connection is closed after this many seconds."""
    graceful_shutdown_timeout_s: float = 30.0
    """On SIGTERM/SIGINT: stop accepting, let running requests finish for up to this long, then abort them."""
    max_connections: int | None = None
    """Open connections served at once; more are answered 503. None: no limit."""
    tokenizer_threads: int = 2
    """Threads that render chat templates and tokenise prompts (off the engine thread and the event loop)."""
    log_level: str = "info"
    """uvicorn's log level: critical, error, warning, info, debug or trace."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"ServerConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_seconds(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        def str_list(v) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) and s for s in v)

        need("host", isinstance(self.host, str) and bool(self.host), "a non-empty string")
        need("port", is_int(self.port) and 0 <= self.port <= 65535, "an integer in [0, 65535]")
        need("served_model_name", self.served_model_name is None
             or (isinstance(self.served_model_name, str) and bool(self.served_model_name)), "None or a non-empty string")
        need("api_key", self.api_key is None or (isinstance(self.api_key, str) and bool(self.api_key)),
             "None or a non-empty string")
        need("allowed_hosts", self.allowed_hosts is None or (str_list(self.allowed_hosts) and bool(self.allowed_hosts)),
             "None or a non-empty list of host names")
        need("cors_allow_origins", str_list(self.cors_allow_origins), "a list of origins (e.g. https://example.com)")
        need("max_request_body_bytes", is_int(self.max_request_body_bytes) and self.max_request_body_bytes >= 1024,
             "an integer >= 1024")
        need("request_body_timeout_s", is_seconds(self.request_body_timeout_s), "a number of seconds > 0")
        need("max_waiting_requests", is_int(self.max_waiting_requests) and self.max_waiting_requests >= 0,
             "an integer >= 0")
        need("request_timeout_s", self.request_timeout_s is None or is_seconds(self.request_timeout_s),
             "None or a number of seconds > 0")
        need("keep_alive_timeout_s", is_seconds(self.keep_alive_timeout_s), "a number of seconds > 0")
        need("graceful_shutdown_timeout_s", is_seconds(self.graceful_shutdown_timeout_s), "a number of seconds > 0")
        need("max_connections", self.max_connections is None or (is_int(self.max_connections)
                                                                  and self.max_connections >= 1), "None or >= 1")
        need("tokenizer_threads", is_int(self.tokenizer_threads) and 1 <= self.tokenizer_threads <= 64,
             "an integer in [1, 64]")
        need("log_level", self.log_level in ("critical", "error", "warning", "info", "debug", "trace"),
             "one of critical, error, warning, info, debug, trace")

    def host_allow_list(self) -> list[str]:
        """The Host header names accepted (lower case; ["*"]: any)."""
        if self.allowed_hosts is not None:
            return [h.lower() for h in self.allowed_hosts]
        return list(LOOPBACK_NAMES) if is_loopback(self.host) else ["*"]
