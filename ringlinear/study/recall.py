"""Multi-query associative recall (MQAR, Arora et al. 2023): a context of key-value pairs followed by
queries of keys seen earlier; the model must emit each key's value. Accuracy is measured teacher-forced
(argmax at the value positions), at growing context lengths — the task pure linear attention fails.

Token layout (vocab offsets so keys and values never collide): [k1 v1 k2 v2 ... kN vN | q1 a1 q2 a2 ...].
"""

from __future__ import annotations

import torch

from ringlinear.model import IGNORE_INDEX


class RecallTask:
    def __init__(self, vocab_size: int, num_keys: int = 64, num_values: int = 64, first_token: int = 4):
        if first_token + num_keys + num_values > vocab_size:
            raise ValueError(f"RecallTask: {num_keys} keys + {num_values} values from token {first_token} "
                             f"do not fit a vocabulary of {vocab_size}")
        self.key0, self.val0 = first_token, first_token + num_keys
        self.num_keys, self.num_values = num_keys, num_values

    def sample(self, num_pairs: int, num_queries: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence (ids [2P + 2Q]) and its labels (the value after each query, else IGNORE_INDEX)."""
        if num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={num_pairs} exceeds the {self.num_keys} distinct keys")
        keys = torch.randperm(self.num_keys, generator=gen)[:num_pairs] + self.key0
        vals = torch.randint(0, self.num_values, (num_pairs,), generator=gen) + self.val0
        q = torch.randint(0, num_pairs, (num_queries,), generator=gen)
        ctx = torch.stack([keys, vals], 1).reshape(-1)
        qa = torch.stack([keys[q], vals[q]], 1).reshape(-1)
        ids = torch.cat([ctx, qa])
        labels = torch.full_like(ids, IGNORE_INDEX)
        qpos = 2 * num_pairs + 2 * torch.arange(num_queries)
        labels[qpos] = vals[q]  # predict the value from the query key's position
        return ids, labels

    def batch(self, rows: int, num_pairs: int, num_queries: int, seed: int):
        """Packed rows: (ids [T], labels [T], cu_seqlens [rows+1] int32)."""
        gen = torch.Generator().manual_seed(seed)
        parts = [self.sample(num_pairs, num_queries, gen) for _ in range(rows)]
        ids = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        n = parts[0][0].numel()
        return ids, labels, torch.arange(0, rows * n + 1, n, dtype=torch.int32)


@torch.no_grad()
def recall_accuracy(model, task: RecallTask, num_pairs: int, num_queries: int, rows: int = 16, seed: int = 0) -> float:
    """Fraction of query positions whose argmax is the right value."""
    from ringlinear.layers.attention_context import PackedContext

    ids, labels, cu = task.batch(rows, num_pairs, num_queries, seed)
    dev = next(model.parameters()).device
    lens = (cu[1:] - cu[:-1]).tolist()
    logits = model(ids.to(dev), PackedContext.from_lens(lens, dev))
    m = labels != IGNORE_INDEX
    return (logits.argmax(-1).cpu()[m] == labels[m]).float().mean().item()
