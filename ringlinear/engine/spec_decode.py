"""Speculative decoding with the model's MTP module (docs/architecture.md, "Speculative decoding"): the MTP layer
drafts k tokens per sequence as a chain (depth 1 reused for every step), one target forward verifies the k + 1
positions, and rejection sampling (Leviathan et al. 2023, Chen et al. 2023) keeps each emitted token distributed as
the target's: draft d ~ q is accepted with probability min(1, p(d) / q(d)), else the token is drawn from
norm(max(0, p - q)); after k acceptances a bonus token is drawn from the last position's p. Greedy: d is accepted
iff it is the target's argmax, so the tokens are exactly those of plain greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlinear.engine.sampler import GREEDY_BELOW, filter_logits, process_logits
from ringlinear.engine.sequence import SamplingParams


@dataclass
class SpecStats:
    """Counts since the engine started: verify steps (one per sequence and step that verified drafts), draft tokens
    proposed and accepted, tokens emitted by verify steps (accepted drafts + the correction or bonus token, cut at
    a stop)."""

    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (nan before any draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence gains per verify step (1 = nothing accepted; k + 1 at most)."""
        return self.emitted_tokens / self.verify_steps if self.verify_steps else float("nan")

    def as_dict(self) -> dict:
        return {"verify_steps": self.verify_steps, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens, "emitted_tokens": self.emitted_tokens,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step}


def may_speculate(params: SamplingParams, num_outputs: int) -> bool:
    """Whether a sequence's next tokens can be drafted: its target distribution at every drafted position must not
    depend on the drafts themselves, which penalties (token counts) and min_tokens (masking by output length) do.
    Such sequences decode one token per step in the same batch."""
    return not params.penalised and num_outputs >= params.min_tokens


def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from for processed logits [V] or [L, V] (each row on its own: temperature,
    top-k, top-p), as `sample`."""
    shifted = logits - logits.amax(-1, keepdim=True)
    return torch.softmax(filter_logits(shifted / p.temperature, p.top_k, p.top_p), dim=-1)


def _on_host(gen: torch.Generator | None) -> bool:
    """Whether draws with `gen` take host probabilities (the CPU generator: seeded results equal across devices)."""
    return gen is not None and gen.device.type == "cpu"


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return int(torch.multinomial(probs, 1, generator=gen)[0])


def _draw_rows(rows: list[torch.Tensor], generators: list) -> list[int]:
    """One token from each distribution `rows[i]` [V] with `generators[i]`: the rows drawn with a CPU generator
    reach the host in one transfer (one sync for the batch, not one per row)."""
    host = [i for i, g in enumerate(generators) if _on_host(g) and rows[i].device.type != "cpu"]
    moved = dict(zip(host, torch.stack([rows[i] for i in host]).cpu())) if host else {}
    return [_draw(moved.get(i, r), g) for i, (r, g) in enumerate(zip(rows, generators))]


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=gen, device=gen.device if gen is not None else "cpu")[0])


def draft(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> tuple[list[int], list]:
    """One draft token per row of the MTP's fp32 logits [N, V]: greedy rows take the argmax (q one-hot, kept as
    None), sampled rows draw from q (the request's temperature, top-k, top-p and logit_bias applied to the MTP's
    logits), returned for the acceptance test. Device->host reads: one for the argmaxes, one for the sampled rows'
    distributions, whatever N."""
    proc = process_logits(logits.float(), params)
    tokens = torch.argmax(proc, dim=-1).tolist()
    probs: list = [None] * len(params)
    sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    for i in sampled:
        probs[i] = _probs(proc[i], params[i])
    for i, tok in zip(sampled, _draw_rows([probs[i] for i in sampled], [generators[i] for i in sampled])):
        tokens[i] = tok
    return tokens, probs


def accept(logits: torch.Tensor, drafts: list[list[int]], draft_probs: list[list], params: list[SamplingParams],
           generators: list) -> tuple[list[list[int]], list[int], list[str | None]]:
    """Verify k drafts per sequence against the target's fp32 logits [N, k + 1, V] (row j: the distribution of the
    token after the sequence's j-th verified input). Returns per sequence the emitted tokens (the accepted drafts
    then one correction or bonus token: 1..k + 1), the number of accepted drafts, and an error (non-finite logits)
    or None. Device->host reads: one for greedy rows; sampled rows add one for every p(d), q(d) and one for the
    distributions the correction or bonus tokens are drawn from, whatever N (the uniforms come from each
    request's generator on the host, in the order of the sequential test)."""
    N, L, V = logits.shape
    logits = logits.float()
    proc = process_logits(logits.reshape(N * L, V), [p for p in params for _ in range(L)]).view(N, L, V)
    finite = (torch.isfinite(logits.amax(-1)) & ~torch.isnan(logits).any(-1)).all(-1)
    host = torch.cat([torch.argmax(proc, dim=-1), finite[:, None].long()], 1).tolist()  # one read
    best = [r[:L] for r in host]
    out: list = [None] * N
    num_acc: list = [0] * N
    errors: list = [None] * N
    sampled = []
    for i, p in enumerate(params):
        if not host[i][L]:
            out[i] = [best[i][0]]
            errors[i] = ("the model's logits for this request are not finite (NaN, +inf or all -inf): no token can be "
                         "sampled")
            continue
        d = drafts[i]
        if p.temperature < GREEDY_BELOW:
            a = 0
            while a < len(d) and d[a] == best[i][a]:
                a += 1
            out[i] = d[:a] + [best[i][a]]
            num_acc[i] = a
            continue
        sampled.append(i)
    if not sampled:
        return out, num_acc, errors
    # p(d_j) and q(d_j) of every sampled sequence's drafts in one read
    P = {i: _probs(proc[i], params[i]) for i in sampled}
    pq = []
    for i in sampled:
        k = len(drafts[i])
        if k:
            d = torch.tensor(drafts[i], device=proc.device)
            pq.append(P[i][torch.arange(k, device=proc.device), d])
            pq.append(torch.stack(list(draft_probs[i]))[torch.arange(k, device=proc.device), d])
    vals = torch.cat(pq).tolist() if pq else []
    rows, at = [], 0
    for i in sampled:
        k = len(drafts[i])
        pd, qd = vals[at : at + k], vals[at + k : at + 2 * k]
        at += 2 * k
        gen, tokens = generators[i], []
        for j, tok in enumerate(drafts[i]):
            if _uniform(gen) < pd[j] / qd[j]:
                tokens.append(tok)
                continue
            resid = (P[i][j] - draft_probs[i][j]).clamp(min=0)
            rows.append(torch.where(resid.sum() > 0, resid, P[i][j]))  # on the device: no read
            break
        else:
            rows.append(P[i][k])  # every draft accepted: the bonus token from the last row
        out[i] = tokens
    for i, tok in zip(sampled, _draw_rows(rows, [generators[i] for i in sampled])):
        out[i].append(tok)
        num_acc[i] = len(out[i]) - 1
    return out, num_acc, errors
