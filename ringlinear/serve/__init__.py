"""The OpenAI-compatible HTTP server: `serve(engine_config, server_config)`; `app.build_app` over an
`async_engine.AsyncLLMEngine` for tests and embedding. `ServerConfig` imports without the [serve] extra."""

from __future__ import annotations

from ringlinear.serve.config import ServerConfig

__all__ = ["ServerConfig", "serve"]


def serve(engine_config, server_config: ServerConfig) -> None:
    """Serve `engine_config`'s checkpoint over HTTP until SIGTERM/SIGINT (`ringlinear.serve.server.serve`)."""
    from ringlinear.serve.server import serve as run

    run(engine_config, server_config)
