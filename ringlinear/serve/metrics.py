"""/metrics in Prometheus' text format (`prometheus_client`, one registry per app): the engine's load (requests
running and waiting, KV blocks and state slots in use, read from the scheduler and the cache on the engine
thread), its work (prefill and decode tokens computed, preemptions: the scheduler's counters; speculative decoding's
draft tokens proposed and accepted, verify steps and the tokens they emitted), choices
finished by reason, and latency histograms (time to first token, inter-token latency) timed on the engine
thread as outputs leave it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ringlinear.engine.sequence import RequestOutput

PREFIX = "ringlinear_"
# seconds; vLLM's buckets for the same two histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)


@dataclass
class EngineSnapshot:
    """The engine's numbers at one moment (taken on the engine thread, between steps)."""

    requests_running: int
    requests_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    state_slots_used: int
    state_slots_total: int
    prefill_tokens: int
    decode_tokens: int
    preemptions: int
    spec_verify_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0


def snapshot(engine) -> EngineSnapshot:
    """Read an `LLMEngine`'s scheduler and cache; call on its thread. A request with several sequences counts as
    running when any of them runs."""
    sched = engine.scheduler
    cache, layout = sched.cache, sched.cache.layout
    running = {s.request_id for s in sched.running}
    waiting = {s.request_id for s in sched.waiting} - running
    spec = engine.spec_stats
    return EngineSnapshot(len(running), len(waiting), layout.num_blocks - cache.num_free_blocks() if cache.kv else 0,
                          layout.num_blocks if cache.kv else 0, layout.num_slots - len(cache.free_slots),
                          layout.num_slots, sched.num_prefill_tokens, sched.num_decode_tokens, sched.num_preemptions,
                          spec.verify_steps, spec.draft_tokens, spec.accepted_tokens, spec.emitted_tokens)


class _EngineCollector:
    """Gauges and counters from the last snapshot (the engine keeps the counts; this only reports them)."""

    def __init__(self):
        self.last: EngineSnapshot | None = None

    def collect(self):
        s = self.last
        if s is None:
            return
        for name, doc, value in (
                ("num_requests_running", "Requests with a sequence in the running batch.", s.requests_running),
                ("num_requests_waiting", "Requests waiting for admission (none of their sequences running).",
                 s.requests_waiting),
                ("kv_cache_blocks_used", "KV cache blocks (softmax layers) held by sequences.", s.kv_blocks_used),
                ("kv_cache_blocks_total", "KV cache blocks (softmax layers) in all.", s.kv_blocks_total),
                ("state_slots_used", "Linear-attention state slots held by running sequences.", s.state_slots_used),
                ("state_slots_total", "Linear-attention state slots in all (max_num_seqs).", s.state_slots_total)):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        for name, doc, value in (
                ("prefill_tokens", "Tokens computed in prefill chunks (prompts, and recomputation after preemption).",
                 s.prefill_tokens),
                ("decode_tokens", "Tokens computed in decode steps (one per running sequence and step).",
                 s.decode_tokens),
                ("num_preemptions", "Sequences preempted (cache freed, recomputed later).", s.preemptions),
                ("spec_decode_num_verify_steps", "Speculative decoding: sequence-steps that verified MTP drafts.",
                 s.spec_verify_steps),
                ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed by the MTP module.",
                 s.spec_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted (acceptance rate = "
                 "accepted / draft).", s.spec_accepted_tokens),
                ("spec_decode_num_emitted_tokens", "Speculative decoding: tokens emitted by verify steps (accepted "
                 "drafts + one corrected or bonus token each; per verify step: the mean accepted length).",
                 s.spec_emitted_tokens)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class ServingMetrics:
    """The metrics of one server. Registered as the async engine's `observer`: `added`, `output` and `forget` run
    on the engine thread (a few dict operations and histogram observations per output)."""

    def __init__(self, async_engine):
        self.async_engine = async_engine
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a request's arrival at the engine "
                              "to its first generated token.", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between successive outputs of a "
                             "choice that bring new tokens.", buckets=ITL_BUCKETS, registry=self.registry)
        self.finished = Counter(PREFIX + "choices_finished", "Choices (sequences: n per prompt) finished, by "
                                "reason (stop, length, abort, error).", ["finish_reason"], registry=self.registry)
        self._arrival: dict[str, float] = {}  # engine thread only, as the two below
        self._first_seen: set[str] = set()
        self._last: dict[str, dict[int, tuple[int, float]]] = {}  # request -> choice -> (tokens seen, when)
        async_engine.observer = self

    # ---- on the engine thread -----------------------------------------------------------------------
    def added(self, request_id: str, arrival: float) -> None:
        self._arrival[request_id] = arrival

    def output(self, out: RequestOutput) -> None:
        rid, now = out.request_id, time.monotonic()
        if out.finished:  # a request's outputs arrive once finished: each choice counted once
            for c in out.outputs:
                self.finished.labels(c.finish_reason or "abort").inc()
        arrival = self._arrival.get(rid)
        if arrival is None:  # aborted and forgotten: its last output is not a latency
            return
        last = self._last.setdefault(rid, {})
        for c in out.outputs:
            seen, when = last.get(c.index, (0, arrival))
            if len(c.token_ids) > seen:
                if rid not in self._first_seen:
                    self._first_seen.add(rid)
                    self.ttft.observe(now - arrival)
                elif seen:
                    self.itl.observe(now - when)
                last[c.index] = (len(c.token_ids), now)

    def forget(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._first_seen.discard(request_id)
        self._last.pop(request_id, None)

    # ---- on the event loop --------------------------------------------------------------------------
    async def render(self) -> bytes:
        """The text exposition, with the engine's numbers read on its thread just before."""
        engine = self.async_engine.engine
        self._engine.last = await asyncio.wrap_future(self.async_engine.call(lambda: snapshot(engine)))
        return generate_latest(self.registry)
