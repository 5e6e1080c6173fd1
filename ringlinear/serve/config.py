"""`ServerConfig`: how the HTTP server listens and what it lets in (authentication, allowed hosts and origins,
size, count and time limits). The engine's own settings are `EngineConfig`'s."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar

from ringlinear.config_base import ConfigBase

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig(ConfigBase):
    _where: ClassVar[str] = "server config"

    host: str = "127.0.0.1"
    """Address to listen on. A loopback address keeps the server on this machine; 0.0.0.0 opens it to the network."""
    port: int = 8000
    """TCP port to listen on (0: any free port)."""
    served_model_name: str | None = None
    """The model name clients send and see in /v1/models (default: the checkpoint directory's name)."""
    api_key: str | None = None
    """When set, /v1/*, /tokenize and /detokenize require the header `Authorization: Bearer <api_key>` (401
    otherwise); /health and /metrics stay open."""
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

    def validate(self) -> None:
        super().validate()
        need = self.require
        need(bool(self.host), "host", "must be a non-empty string")
        need(0 <= self.port <= 65535, "port", "must be an integer in [0, 65535]")
        need(self.served_model_name is None or bool(self.served_model_name), "served_model_name",
             "must be null or a non-empty string")
        need(self.api_key is None or bool(self.api_key), "api_key", "must be null or a non-empty string")
        need(self.allowed_hosts is None or (bool(self.allowed_hosts) and all(self.allowed_hosts)), "allowed_hosts",
             "must be null or a non-empty list of host names")
        need(all(self.cors_allow_origins), "cors_allow_origins", "must be a list of origins (e.g. https://example.com)")
        need(self.max_request_body_bytes >= 1024, "max_request_body_bytes", "must be an integer >= 1024")
        for name in ("request_body_timeout_s", "keep_alive_timeout_s", "graceful_shutdown_timeout_s"):
            need(getattr(self, name) > 0, name, "must be a number of seconds > 0")
        need(self.request_timeout_s is None or self.request_timeout_s > 0, "request_timeout_s",
             "must be null or a number of seconds > 0")
        need(self.max_waiting_requests >= 0, "max_waiting_requests", "must be an integer >= 0")
        need(self.max_connections is None or self.max_connections >= 1, "max_connections", "must be null or >= 1")
        need(1 <= self.tokenizer_threads <= 64, "tokenizer_threads", "must be an integer in [1, 64]")
        need(self.log_level in ("critical", "error", "warning", "info", "debug", "trace"), "log_level",
             "must be one of critical, error, warning, info, debug, trace")

    def host_allow_list(self) -> list[str]:
        """The Host header names accepted (lower case; ["*"]: any)."""
        if self.allowed_hosts is not None:
            return [h.lower() for h in self.allowed_hosts]
        return list(LOOPBACK_NAMES) if is_loopback(self.host) else ["*"]
