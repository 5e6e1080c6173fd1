"""`serve(engine_config, server_config)`: load the checkpoint into an engine and serve it with uvicorn until
SIGTERM/SIGINT, then shut down within a bound: stop accepting, let running requests finish for
`graceful_shutdown_timeout_s`, abort the rest (each client still gets its final message), exit."""

from __future__ import annotations

import threading

import uvicorn

from ringlinear.engine.llm import EngineConfig, LLMEngine
from ringlinear.serve.app import build_app
from ringlinear.serve.async_engine import AsyncLLMEngine
from ringlinear.serve.config import ServerConfig

FINAL_MESSAGES_S = 5.0  # after the aborts, how long uvicorn waits for the final messages to go out


class GracefulServer(uvicorn.Server):
    """uvicorn's server, which on the first exit signal also starts the clock of the grace period; when it runs
    out the engine aborts what is left, so streams end with finish_reason "abort" and [DONE] rather than a
    dropped connection. uvicorn's own graceful timeout (longer by `FINAL_MESSAGES_S`) is the backstop."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncLLMEngine, grace_s: float):
        super().__init__(config)
        self.async_engine, self.grace_s = async_engine, grace_s

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.grace_s, self.async_engine.abort_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def uvicorn_config(app, server_config: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings from `server_config`: address, log level, keep-alive, graceful shutdown, connections."""
    return uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=server_config.log_level,
        timeout_keep_alive=server_config.keep_alive_timeout_s,
        timeout_graceful_shutdown=server_config.graceful_shutdown_timeout_s + FINAL_MESSAGES_S,
        limit_concurrency=server_config.max_connections)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Serve the checkpoint of `engine_config` over HTTP as `server_config` says, until a signal ends it."""
    server_config.validate()
    async_engine = AsyncLLMEngine(LLMEngine(engine_config), server_config.max_waiting_requests,
                                  server_config.request_timeout_s)
    app = build_app(async_engine, server_config)
    try:
        server = GracefulServer(uvicorn_config(app, server_config), async_engine,
                                server_config.graceful_shutdown_timeout_s)
        async_engine.on_fatal = lambda error: setattr(server, "should_exit", True)  # a dead engine ends the server
        print(f"serving {app.state.limits.model_name} (max_model_len {async_engine.max_model_len}) at "
              f"http://{server_config.host}:{server_config.port}/v1", flush=True)
        server.run()
    finally:
        async_engine.shutdown()
        async_engine.engine.shutdown()
        app.state.prompts.shutdown()
    if async_engine.fatal_error is not None:
        raise async_engine.fatal_error
