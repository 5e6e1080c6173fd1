"""Token sampling from fp32 logits: greedy, temperature, top-k, top-p, per-request seeds; returns the chosen
tokens and their log-probabilities under the model's own distribution (log_softmax of the raw logits, the
quantity RL compares with the trainer). No parameter value can make it produce NaN or raise: a temperature
below `GREEDY_BELOW` is greedy, logits are shifted by their maximum before the division, the top token always
survives top-p; a row without a usable maximum (NaN, +inf, all -inf) is reported as that row's error."""

from __future__ import annotations

import torch

from ringlinear.engine.sequence import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM's _SAMPLING_EPS): 1/T would dwarf any logit gap


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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> tuple[list[int], list[float], list[str | None]]:
    """logits: [N, V] fp32, one row per sequence -> (token ids, log p(token) under softmax(logits), errors): a row
    whose logits have no finite maximum or contain NaN gets an error message (its token and logprob are then
    meaningless); the other rows are unaffected."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    peak = logits.max(dim=-1).values
    usable = (torch.isfinite(peak) & ~torch.isnan(logits).any(dim=-1)).tolist()
    errors: list[str | None] = [None if ok else "the model's logits for this request are not finite (NaN, +inf or "
                                "all -inf): no token can be sampled" for ok in usable]
    for i, p in enumerate(params):
        if not usable[i] or p.temperature < GREEDY_BELOW:
            continue
        # shifted so the top logit is 0: the division can only send others towards -inf, never make NaN
        row = filter_logits((logits[i] - peak[i]) / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i] if generators[i] is not None else default_generator
        # multinomial on the CPU generator keeps seeded results identical across devices
        if gen is not None and gen.device != probs.device:
            probs = probs.cpu()
        try:
            tokens[i] = torch.multinomial(probs, 1, generator=gen).to(tokens.device)[0]
        except RuntimeError as e:  # not expected after the checks above; if it happens, only this row fails
            errors[i] = f"sampling failed: {e}"
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist(), errors
