"""Token sampling from fp32 logits: min_tokens masking, logit_bias, repetition/frequency/presence penalties (in
vLLM's order, batched on the device), then greedy, temperature, top-k, top-p, per-request seeds. The reported
logprobs (chosen token, its rank, top-k alternatives) are the model's own distribution: log_softmax of the raw
logits (vLLM's default `raw_logprobs`, the quantity RL compares with the trainer), so penalties, bias and
temperature change what is sampled, not what is reported. No parameter value can make it produce NaN or raise:
a temperature below `GREEDY_BELOW` is greedy, processed logits are clamped to finite values and shifted by their
maximum before the division, the top token always survives top-p; a row without a usable maximum (NaN, +inf,
all -inf) is reported as that row's error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlinear.engine.sequence import Logprob, SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM's _SAMPLING_EPS): 1/T would dwarf any logit gap
_FLOAT_MAX = torch.finfo(torch.float32).max


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p exclude; the top token always stays. logits: [V] or [N, V] (already
    temperature-scaled)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; a top_p that rounds to 0 in fp32
        # would drop the top token too, so it is kept explicitly
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass
class Penalties:
    """Token history of the penalised rows of a batch: `rows [P]` (indices into the batch), `counts [P, V]`
    (times each token was generated) and `seen [P, V]` (the token is in the prompt or the output)."""

    rows: list[int]
    counts: torch.Tensor
    seen: torch.Tensor


@dataclass
class Sampled:
    """Per row: the token, log p(token) under the model, its rank (1 = most likely; None where logprobs were not
    asked), the top alternatives [(id, logprob)] (empty unless asked), and an error message or None."""

    tokens: list[int]
    logprobs: list[float]
    ranks: list[int | None]
    top: list[list[tuple[int, float]]]
    errors: list[str | None]


def process_logits(logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int] | None = None,
                   stop_ids: list[list[int]] | None = None, penalties: Penalties | None = None) -> torch.Tensor:
    """What sampling draws from, before temperature: min_tokens masks each row's `stop_ids` (EOS and stop tokens)
    while its `num_outputs` < min_tokens; logit_bias adds; penalties (vLLM/HF repetition over prompt + output,
    OpenAI frequency and presence over the output) apply; overflow is clamped to the largest finite float. One
    batched device op per kind, whatever the batch."""
    dev = logits.device
    out = logits
    masked_rows: list[int] = []
    masked_ids: list[int] = []
    if num_outputs is not None and stop_ids is not None:
        for i, p in enumerate(params):
            if p.min_tokens and num_outputs[i] < p.min_tokens and stop_ids[i]:
                masked_rows += [i] * len(stop_ids[i])
                masked_ids += stop_ids[i]
    bias = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if masked_ids or bias or penalties is not None:
        out = logits.clone()
    if bias:
        ids = torch.tensor([t for _, b in bias for t in b], dtype=torch.long)
        vals = torch.tensor([v for _, b in bias for v in b.values()], dtype=torch.float32)
        rows = torch.tensor([i for i, b in bias for _ in b], dtype=torch.long)
        keep = ids < logits.shape[1]  # the engine refuses larger ids; a direct caller's are ignored
        out.index_put_((rows[keep].to(dev), ids[keep].to(dev)), vals[keep].to(dev), accumulate=True)
    if masked_ids:
        ids = torch.tensor(masked_ids, dtype=torch.long)
        rows = torch.tensor(masked_rows, dtype=torch.long)
        keep = ids < logits.shape[1]
        out.index_put_((rows[keep].to(dev), ids[keep].to(dev)), torch.tensor(float("-inf"), device=dev))
    if penalties is not None and penalties.rows:
        rows = torch.tensor(penalties.rows, dtype=torch.long, device=dev)
        ps = [params[i] for i in penalties.rows]
        rep = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32, device=dev)[:, None]
        x = out.index_select(0, rows)
        x = torch.where(penalties.seen, torch.where(x > 0, x / rep, x * rep), x)
        counts = penalties.counts.float()
        x = x - freq * counts - pres * (counts > 0).float()
        out.index_copy_(0, rows, x)
    if out is not logits:
        out = out.clamp(max=_FLOAT_MAX)  # a huge logit divided by a small repetition penalty: inf -> finite
    return out


def token_logprobs(logp: torch.Tensor, ids: torch.Tensor, top: list[int | None]) -> tuple[list[float],
                                                                                       list[int | None],
                                                                                       list[list[tuple[int, float]]]]:
    """logp: [N, V] log-probabilities, ids: [N] chosen tokens, top: per row None (logprob only, no rank), 0 (and
    its rank) or k (and the top-k alternatives) -> (logprobs, ranks, alternatives). Batched: one gather, one
    comparison for the ranks, one top-k."""
    chosen = logp.gather(1, ids[:, None])[:, 0]
    asked = [i for i, k in enumerate(top) if k is not None]
    ranks: list[int | None] = [None] * len(top)
    alts: list[list[tuple[int, float]]] = [[] for _ in top]
    if asked:
        idx = torch.tensor(asked, dtype=torch.long, device=logp.device)
        sub = logp.index_select(0, idx)
        r = ((sub > chosen.index_select(0, idx)[:, None]).sum(-1) + 1).tolist()
        for i, rank in zip(asked, r):
            ranks[i] = rank
        k = max(top[i] for i in asked)
        if k > 0:
            vals, tids = torch.topk(sub, min(k, logp.shape[1]), dim=-1)
            vals, tids = vals.tolist(), tids.tolist()
            for j, i in enumerate(asked):
                alts[i] = list(zip(tids[j][: top[i]], vals[j][: top[i]]))
    return chosen.tolist(), ranks, alts


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None, *, num_outputs: list[int] | None = None,
           stop_ids: list[list[int]] | None = None, penalties: Penalties | None = None) -> Sampled:
    """logits: [N, V] fp32, one row per sequence -> `Sampled`. `num_outputs`, `stop_ids` (per row: tokens that
    end it, masked under min_tokens) and `penalties` feed `process_logits`. A row whose raw logits have no finite
    maximum or contain NaN, or whose processed logits mask every token, gets an error message (its token and
    logprob are then meaningless); the other rows are unaffected."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    peak = logits.max(dim=-1).values
    usable = torch.isfinite(peak) & ~torch.isnan(logits).any(dim=-1)
    proc = process_logits(logits, params, num_outputs, stop_ids, penalties)
    proc_peak = peak if proc is logits else proc.max(dim=-1).values
    tokens = torch.argmax(proc, dim=-1)
    usable_l, masked_l = usable.tolist(), torch.isfinite(proc_peak).tolist()
    errors: list[str | None] = [
        None if ok and alive else
        ("the model's logits for this request are not finite (NaN, +inf or all -inf): no token can be sampled"
         if not ok else "every token is masked (min_tokens stop tokens, logit_bias): no token can be sampled")
        for ok, alive in zip(usable_l, masked_l)]
    for i, p in enumerate(params):
        if errors[i] is not None or p.temperature < GREEDY_BELOW:
            continue
        # shifted so the top logit is 0: the division can only send others towards -inf, never make NaN
        row = filter_logits((proc[i] - proc_peak[i]) / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i] if generators[i] is not None else default_generator
        # multinomial on the CPU generator keeps seeded results identical across devices
        if gen is not None and gen.device != probs.device:
            probs = probs.cpu()
        try:
            tokens[i] = torch.multinomial(probs, 1, generator=gen).to(tokens.device)[0]
        except RuntimeError as e:  # not expected after the checks above; if it happens, only this row fails
            errors[i] = f"sampling failed: {e}"
    chosen, ranks, top = token_logprobs(logp, tokens, [p.logprobs for p in params])
    return Sampled(tokens.tolist(), chosen, ranks, top, errors)


class TokenHistory:
    """Per state slot, on the device: how often each token was generated (`counts [slots, V]` int32) and whether
    it occurs in the prompt or the output (`seen [slots, V]` bool), for the penalties. Allocated at the first
    penalised request; a sequence's row is built from its tokens when it first samples in a slot (admission,
    fork, after preemption: O(its length) once), then updated by one scatter per step (O(batch))."""

    def __init__(self, num_slots: int, vocab_size: int, device):
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, torch.device(device)
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.owner: list = [None] * num_slots  # the sequence whose history a slot's row holds

    def gather(self, seqs: list, rows: list[int]) -> Penalties:
        """The history of `seqs[i] for i in rows` (each holding a state slot)."""
        if self.counts is None:
            self.counts = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.int32, device=self.device)
            self.seen = torch.zeros(self.num_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        for i in rows:
            s = seqs[i]
            if self.owner[s.slot] is not s:  # new in this slot: build its row once
                out = torch.tensor(s.output_token_ids, dtype=torch.long).to(self.device)
                self.counts[s.slot] = torch.bincount(out, minlength=self.vocab_size)[: self.vocab_size].int()
                self.seen[s.slot] = False
                self.seen[s.slot, torch.tensor(s.token_ids, dtype=torch.long).to(self.device)] = True
                self.owner[s.slot] = s
        slots = torch.tensor([seqs[i].slot for i in rows], dtype=torch.long).to(self.device)
        return Penalties(rows, self.counts.index_select(0, slots), self.seen.index_select(0, slots))

    def append(self, seqs: list, tokens: list[int]) -> None:
        """Count one new token of each sequence (those with a row in this history)."""
        pairs = [(s.slot, t) for s, t in zip(seqs, tokens) if 0 <= s.slot < self.num_slots and self.owner[s.slot] is s]
        if not pairs or self.counts is None:
            return
        idx = torch.tensor(pairs, dtype=torch.long).to(self.device)
        self.counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(pairs), dtype=torch.int32,
                                                                  device=self.device), accumulate=True)
        self.seen[idx[:, 0], idx[:, 1]] = True


def make_logprobs(chosen: int, logprob: float, rank: int | None, top: list[tuple[int, float]],
                  text) -> dict[int, Logprob]:
    """vLLM's per-token logprobs dict: the chosen token first, then the top alternatives (ranks 1..k)."""
    out = {chosen: Logprob(logprob, rank, text(chosen))}
    for r, (t, lp) in enumerate(top, start=1):
        if t not in out:
            out[t] = Logprob(lp, r, text(t))
    return out
