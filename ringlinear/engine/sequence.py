"""Requests as the engine sees them: sampling parameters (validated, naming the bad field), a `Sequence` per
completion (prompt + generated tokens, cache placement, state), the `Request` grouping a prompt's `n` sequences,
and the outputs handed back in vLLM's shape (`RequestOutput` holding one `CompletionOutput` per choice)."""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range of a logit_bias value; larger values are clamped to it


class RequestError(ValueError):
    """A request the engine cannot take; `field` names the offending request field (HTTP 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """How to sample, as vLLM's `SamplingParams`. Penalties, `logit_bias` and `min_tokens` change what is sampled;
    the reported logprobs stay the model's own distribution (log_softmax of the raw logits, vLLM's default
    `raw_logprobs`)."""

    n: int = 1  # completions of the prompt (the prompt is computed once and the sequence forked)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    seed: int | None = None  # choice i of the request draws with seed + i
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop tokens are masked (and stop strings not checked) until this many tokens
    stop: list[str] | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None  # extra stop tokens (the EOS token stops unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top-k alternatives (k <= 20)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    presence_penalty: float = 0.0  # OpenAI: minus this from each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the number of times a token was generated
    repetition_penalty: float = 1.0  # HF/vLLM: tokens of the prompt or the output: logit / p if > 0 else logit * p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (clamped to [-100, 100])

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name, msg):
            raise RequestError(name, msg)

        if isinstance(self.logprobs, bool):  # the boolean form of the previous release
            warnings.warn("SamplingParams(logprobs=True/False) is deprecated: pass an int (0 = the chosen token's "
                          "logprob, k = also the top-k alternatives) or None", DeprecationWarning, stacklevel=3)
            self.logprobs = 0 if self.logprobs else None
        if not _is_int(self.n) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if not _is_finite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", f"must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.stop is not None and (not isinstance(self.stop, list)
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_finite(v) or not -2.0 <= v <= 2.0:
                bad(name, f"must be a number in [-2, 2], got {v!r}")
        if not _is_finite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            bad("repetition_penalty", f"must be a number in (0, 100] (1 = off), got {self.repetition_penalty!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", f"must be a dict of token id -> bias, got {self.logit_bias!r}")
            for k, v in self.logit_bias.items():
                if not _is_int(k) or k < 0:
                    bad("logit_bias", f"keys must be token ids (integers >= 0), got {k!r}")
                if not _is_finite(v):
                    bad("logit_bias", f"values must be finite numbers, got {v!r} for token {k}")
            self.logit_bias = {k: max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v)))
                               for k, v in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Any of presence, frequency, repetition penalty set (they need the sequence's token counts)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """One token's log-probability under the model, its rank (1 = the most likely token) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(eq=False)
class Sequence:
    """One completion. `token_ids` = prompt + generated; the first `num_computed` of them are in the cache
    (KV pages of the softmax layers, the state slot of the linear layers). Before it is forked, the first
    sequence of a request with n > 1 stands for all n choices (`seats` = n)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    index: int = 0  # which choice of its request
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per generated token (when asked)
    cumulative_logprob: float = 0.0
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    block_table: list[int] = field(default_factory=list)
    slot: int = -1
    text: str = ""  # generated text, stop strings cut
    # incremental detokenisation (as vLLM): the text of output tokens [0, detok_read) is `detok_text`; the next
    # delta is decode(out[detok_prefix:]) past decode(out[detok_prefix:detok_read]), so a step decodes a few tokens
    detok_text: str = ""
    detok_prefix: int = 0
    detok_read: int = 0
    num_preemptions: int = 0
    generator: object = None  # torch.Generator when params.seed is set
    seats: int = 1  # entries of max_num_seqs it holds: n until a request's first sequence is forked
    error: str | None = None
    num_cached_tokens: int | None = None  # served by the prefix cache at its first admission (None: not admitted)
    prefix_node: object = None  # the prefix cache's node of its last registered block
    resumed_at: int = 0  # tokens it started from at its last admission (a prefix-cache hit)
    # speculative decoding: the MTP's drafts of the tokens after the last one (with their draft distributions, None
    # when greedy) and the MTP hidden state that continues the chain; empty when the next step does not verify
    draft_tokens: list[int] = field(default_factory=list)
    draft_probs: list = field(default_factory=list)
    mtp_hidden: object = None

    def clear_drafts(self) -> None:
        self.draft_tokens, self.draft_probs, self.mtp_hidden = [], [], None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    """A prompt and its `n` sequences (one per choice; fewer until the first is forked after the prompt)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    generators: list = field(default_factory=list)  # per choice: torch.Generator seeded seed + i, or None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # filled as the prompt is computed

    @property
    def is_finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache served at the first admission."""
        return (self.seqs[0].num_cached_tokens or 0) if self.seqs else 0


@dataclass
class CompletionOutput:
    """One choice of a request (vLLM's `CompletionOutput`)."""

    index: int
    text: str  # generated text so far (stop strings cut)
    token_ids: list[int]  # every generated token so far
    cumulative_logprob: float | None  # sum of the chosen tokens' logprobs (None without logprobs)
    logprobs: list[dict[int, Logprob]] | None  # per token: the chosen token and the top alternatives
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished, else None
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS or length

    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, seq: Sequence) -> CompletionOutput:
        asked = seq.params.logprobs is not None
        return cls(seq.index, seq.text, list(seq.output_token_ids), seq.cumulative_logprob if asked else None,
                   list(seq.logprobs) if asked else None, seq.finish_reason, seq.stop_reason)


def _deprecated(name: str) -> None:
    warnings.warn(f"RequestOutput.{name} is deprecated: read RequestOutput.outputs[i].{name} (vLLM's shape)",
                  DeprecationWarning, stacklevel=3)


@dataclass
class RequestOutput:
    """A request's outputs so far (vLLM's `RequestOutput`): one `CompletionOutput` per choice. The flat `text`,
    `token_ids`, `logprobs` (floats) and `finish_reason` of the previous release read `outputs[0]` and warn."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    error: str | None = None  # why the request failed (a choice finished with "error"); it concerns it only

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        outs = [CompletionOutput.of(s) for s in req.seqs]
        error = next((s.error for s in req.seqs if s.error is not None), None)
        prompt_lp = list(req.prompt_logprobs) if req.prompt_logprobs is not None else None
        # the prompt list is shared, not copied: an output is made for every request at every step, and copying a
        # long prompt each time would make a step's host work grow with the context
        return cls(req.request_id, req.prompt, req.prompt_token_ids, prompt_lp, outs, req.is_finished,
                   req.num_cached_tokens, sum(s.num_preemptions for s in req.seqs), error)

    # ---- the flat fields of the previous release ----------------------------------------------------------
    @property
    def text(self) -> str:
        _deprecated("text")
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        _deprecated("token_ids")
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[float] | None:
        _deprecated("logprobs")
        out = self.outputs[0]
        return None if out.logprobs is None else [d[t].logprob for t, d in zip(out.token_ids, out.logprobs)]

    @property
    def finish_reason(self) -> str | None:
        _deprecated("finish_reason")
        return self.outputs[0].finish_reason
