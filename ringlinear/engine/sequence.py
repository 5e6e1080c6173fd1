"""Requests as the engine sees them: sampling parameters (validated, naming the bad field), a `Sequence`
with its prompt, generated tokens, cache placement and state, and the `RequestOutput` handed back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine cannot take; `field` names the offending request field (HTTP 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None  # extra stop tokens (the EOS token stops unless ignore_eos)
    ignore_eos: bool = False
    logprobs: bool = False  # log p of each chosen token under the model (before temperature/top-k/top-p)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name, msg):
            raise RequestError(name, msg)

        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", f"must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.stop is not None and (not isinstance(self.stop, list)
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids)
        ):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. `token_ids` = prompt + generated; the first `num_computed` of them are in the cache
    (KV pages of the softmax layers, the state slot of the linear layers)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    block_table: list[int] = field(default_factory=list)
    slot: int = -1
    text: str = ""  # generated text, stop strings cut
    num_preemptions: int = 0
    generator: object = None  # torch.Generator when params.seed is set

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
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    logprobs: list[float] | None
    text: str  # generated text so far (stop strings cut)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" while finished, else None
    num_preemptions: int = 0
    error: str | None = None  # why the request failed (finish_reason "error"); it concerns this request only

    @classmethod
    def of(cls, seq: Sequence) -> RequestOutput:
        # the prompt list is shared, not copied: an output is made for every sequence at every step, and copying a
        # long prompt each time would make a step's host work grow with the context
        return cls(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids),
                   list(seq.logprobs) if seq.params.logprobs else None, seq.text, seq.is_finished,
                   seq.finish_reason, seq.num_preemptions)
