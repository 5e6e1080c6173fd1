"""`AsyncLLMEngine`: one background thread owns the `LLMEngine` (not thread-safe) and steps it while there is
work; each request reads its cumulative outputs from an asyncio.Queue. It also admits requests (at most
max_num_seqs running + `max_waiting` waiting) and ends those that outstay `request_timeout_s`."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ringlinear.engine.sequence import RequestError, RequestOutput, SamplingParams


class EngineBusy(Exception):
    """The engine holds as many requests as it admits; the caller should retry later (HTTP 429)."""


class AsyncLLMEngine:
    """Calls from the asyncio side are queued to the engine thread (`call`); the thread runs them between steps,
    steps while requests are unfinished and sleeps on a condition otherwise. Outputs go to each request's
    asyncio.Queue via `call_soon_threadsafe`. A request holds an admission from `reserve` until the engine is
    done with it (finished, failed, aborted or refused)."""

    def __init__(self, engine, max_waiting: int | None = None, request_timeout_s: float | None = None):
        self.engine = engine
        self.max_admitted = None if max_waiting is None else engine.engine_config.max_num_seqs + max_waiting
        self.request_timeout_s = request_timeout_s
        self._cv = threading.Condition()
        self._calls: collections.deque = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._deadlines: dict[str, float] = {}  # engine thread only
        self._timed_out: set[str] = set()  # engine thread only
        self._admitted: set[str] = set()  # guarded by _cv
        self._busy = False
        self._stopping = False
        self.fatal_error: BaseException | None = None  # the engine died (a tensor-parallel rank): nothing runs again
        self.on_fatal: Callable[[BaseException], None] | None = None  # the server sets it to end itself
        # told of each request's arrival and outputs on the engine thread (`serve.metrics.ServingMetrics`)
        self.observer: Any = None
        self._thread = threading.Thread(target=self._loop, name="ringlinear-engine", daemon=True)
        self._thread.start()

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread (before its next step); the future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    # ---- admission ----------------------------------------------------------------------------------
    def reserve(self, request_ids: str | list[str], replacing: str | None = None) -> None:
        """Admit requests, all or none (before a body is read or a prompt tokenised); `EngineBusy` when full.
        `replacing`: an admission of the same caller that these take over (released in the same step). An
        admission ends with `release`: the engine thread releases it when an added request finishes, fails or is
        aborted; a caller that does not get as far as `add` releases it itself."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        with self._cv:
            held = len(self._admitted) - (replacing in self._admitted)
            if self.max_admitted is not None and held + len(ids) > self.max_admitted:
                raise EngineBusy(f"the server holds {held} requests and admits {self.max_admitted}: "
                                 f"{len(ids)} more do not fit, retry later")
            self._admitted.discard(replacing)
            self._admitted.update(ids)

    def release(self, request_id: str) -> None:
        """End a request's admission; idempotent."""
        with self._cv:
            self._admitted.discard(request_id)

    @property
    def num_admitted(self) -> int:
        with self._cv:
            return len(self._admitted)

    # ---- requests -----------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  fill_max_tokens: bool = False, queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Add a request; returns the queue that receives its cumulative `RequestOutput`s (the last one has
        `finished`), or an exception if the engine fails: `queue` when given (several requests may share one: their
        outputs carry their ids), else a new one. `fill_max_tokens`: max_tokens = what the context has left after
        the prompt. Raises `RequestError` for a request the engine refuses."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue() if queue is None else queue
        arrival = time.monotonic()

        def add():
            if fill_max_tokens:
                if len(prompt_ids) >= self.engine.max_model_len:
                    raise RequestError("prompt", f"{len(prompt_ids)} prompt tokens leave no room to generate within "
                                                 f"the maximum length {self.engine.max_model_len}")
                params.max_tokens = max(1, self.engine.max_model_len - len(prompt_ids))
            self.engine.add_request(request_id, prompt_ids, params)
            self._streams[request_id] = (loop, queue)
            if self.observer is not None:
                self.observer.added(request_id, arrival)
            if self.request_timeout_s is not None:
                self._deadlines[request_id] = time.monotonic() + self.request_timeout_s

        try:
            await asyncio.wrap_future(self.call(add))
        except BaseException:  # refused, shut down or cancelled: the add may have run before the cancellation
            self.abort(request_id)
            raise
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request (frees its cache and admission); safe from any thread, for unknown or finished ids too."""
        self.release(request_id)

        def abort():
            self._forget(request_id)
            self.engine.abort_request(request_id)

        try:
            self.call(abort)
        except RuntimeError:
            pass  # shut down: nothing left to free

    def abort_all(self) -> None:
        """Abort every request; each still receives its final output (finish_reason "abort")."""
        def abort_all():
            for rid in list(self._streams):
                self.engine.abort_request(rid)

        try:
            self.call(abort_all)
        except RuntimeError:
            pass

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._calls or self._busy or self._stopping or self._engine_failure()):
                    self._cv.wait(1.0)  # an idle engine's death (a worker process exited) is seen within a second
                calls, self._calls = self._calls, collections.deque()
                stopping = self._stopping
            if self._engine_failure() is not None:
                return self._die(self._engine_failure(), calls)
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
            self._expire()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails the running requests, not the thread
                if getattr(e, "fatal", False):
                    return self._die(e, [])
                traceback.print_exc(file=sys.stderr)
                for rid in list(self._streams):
                    self._fail(rid, e)
                outputs = []
            for out in outputs:
                self._deliver(out)
            self._busy = self.engine.has_unfinished_requests()

    def _engine_failure(self) -> BaseException | None:
        return getattr(self.engine, "failure", None)

    def _die(self, error: BaseException, calls) -> None:
        """The engine cannot continue: fail every request and pending call with `error`, stop, tell the server."""
        print(f"[ringlinear serve] the engine died: {error}", file=sys.stderr, flush=True)
        with self._cv:
            self._stopping = True
            self.fatal_error = error
            calls = list(calls) + list(self._calls)
            self._calls.clear()
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
        for rid in list(self._streams):
            self._fail(rid, error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _expire(self) -> None:
        """Abort the requests past their deadline; `_deliver` reports them as finished by "length"."""
        if not self._deadlines:
            return
        now = time.monotonic()
        for rid in [r for r, t in self._deadlines.items() if t <= now]:
            del self._deadlines[rid]
            self._timed_out.add(rid)
            self.engine.abort_request(rid)

    def _forget(self, request_id: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None:
        if self.observer is not None:
            self.observer.forget(request_id)
        self._deadlines.pop(request_id, None)
        self._timed_out.discard(request_id)
        self.release(request_id)
        return self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        if out.finished and out.request_id in self._timed_out:  # ended by the time limit, not by the client
            out = dataclasses.replace(out, outputs=[dataclasses.replace(c, finish_reason="length")
                                                    if c.finish_reason == "abort" else c for c in out.outputs])
        if self.observer is not None:
            self.observer.output(out)
        entry = self._forget(out.request_id) if out.finished else self._streams.get(out.request_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: nobody will read this request
            self._forget(out.request_id)
            self.engine.abort_request(out.request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        loop, queue = self._forget(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            pass
        try:
            loop.call_soon_threadsafe(queue.put_nowait, error)
        except RuntimeError:
            pass


async def next_output(queue: asyncio.Queue) -> RequestOutput:
    out = await queue.get()
    if isinstance(out, BaseException):
        raise out
    return out
