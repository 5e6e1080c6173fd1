"""Token sampling from fp32 logits: greedy, temperature, top-k, top-p, per-request seeds; returns the chosen
tokens and their log-probabilities under the model's own distribution (log_softmax of the raw logits, the
quantity RL compares with the trainer)."""

from __future__ import annotations

import torch

from ringlinear.engine.sequence import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p exclude. logits: [V] or [N, V] (already temperature-scaled)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """logits: [N, V] fp32, one row per sequence -> (token ids, log p(token) under softmax(logits))."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    for i in rows:
        p = params[i]
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i] if generators[i] is not None else default_generator
        # multinomial on the CPU generator keeps seeded results identical across devices
        if gen is not None and gen.device != probs.device:
            probs = probs.cpu()
        tokens[i] = torch.multinomial(probs, 1, generator=gen).to(tokens.device)[0]
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()
