"""Per-token log-probabilities of sampled completions under a model: the one forward that both the rollout
side (engine weights, no grad) and the trainer (policy weights, with grad) run, so that in aligned mode the
two compute bit-identical numbers. log p(y_t | x, y_<t) = log_softmax(lm_head(norm(h_{t-1})))[y_t], fp32.

Sequences are packed exactly as the trainer packs them (`PackedContext`, same order, same micro-batches):
the Triton prefill's segment length and GEMM tilings depend on the packed size, so the packing is part of
the computation that has to match, not a detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlinear.layers.attention_context import PackedContext


@dataclass
class PackedCompletions:
    """N prompt+completion sequences packed into one row. `positions`: [R] rows of `input_ids` whose next
    token is a completion token; `targets`: [R] those tokens; `seq_index`: [R] the sequence of each."""

    input_ids: torch.Tensor  # [T]
    ctx: PackedContext
    positions: torch.Tensor  # [R] int64
    targets: torch.Tensor  # [R] int64
    seq_index: torch.Tensor  # [R] int64
    num_seqs: int


def pack_completions(prompts: list[list[int]], completions: list[list[int]], device) -> PackedCompletions:
    """Pack each `prompt + completion` (completion tokens scored, prompt tokens context only). The last
    completion token is never an input: it is scored but nothing after it is."""
    if len(prompts) != len(completions):
        raise ValueError(f"pack_completions: {len(prompts)} prompts for {len(completions)} completions")
    ids, lens, pos, tgt, seq = [], [], [], [], []
    offset = 0
    for n, (p, c) in enumerate(zip(prompts, completions)):
        if not p or not c:
            raise ValueError(f"pack_completions: sequence {n} has an empty prompt or completion")
        full = list(p) + list(c)[:-1]
        ids.extend(full)
        lens.append(len(full))
        pos.extend(range(offset + len(p) - 1, offset + len(full)))
        tgt.extend(c)
        seq.extend([n] * len(c))
        offset += len(full)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return PackedCompletions(as_long(ids), PackedContext.from_lens(lens, device), as_long(pos), as_long(tgt),
                             as_long(seq), len(prompts))


def completion_logprobs(model, packed: PackedCompletions, with_entropy: bool = False):
    """fp32 log p of each completion token, [R] (differentiable when grad is on). With `with_entropy`,
    also the entropy of each predicted distribution, [R] (detached)."""
    logits = model(packed.input_ids, packed.ctx, logits_indices=packed.positions)  # [R, V] fp32
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, packed.targets[:, None])[:, 0]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
