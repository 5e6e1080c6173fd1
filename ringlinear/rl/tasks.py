"""Offline RL tasks with verifiable rewards: integer arithmetic and long-context key retrieval.

Each task yields samples `{"prompt": str, "answer": str, ...}` from a seeded generator; its reward is 1.0 when
the first number in the completion equals the answer, else 0.0. Any Python callable
`reward_fn(prompt: str, completion: str, sample: dict) -> float` can stand in (`load_reward("pkg.mod:fn")`).
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable

RewardFn = Callable[[str, str, dict], float]


def _first_token(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(0) if m else None


class ArithmeticTask:
    """"12+7=" -> "19". Operands in [0, max_operand], operators from `ops`."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 20, ops: str = "+-", seed: int = 0):
        if max_operand < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"ArithmeticTask: max_operand >= 1 and ops from '+-*', got {max_operand}, {ops!r}")
        self.max_operand, self.ops, self.rng = max_operand, ops, random.Random(seed)

    def sample(self) -> dict:
        a, b = self.rng.randint(0, self.max_operand), self.rng.randint(0, self.max_operand)
        op = self.rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"prompt": f"{a}{op}{b}=", "answer": str(value)}

    @staticmethod
    def reward(prompt: str, completion: str, sample: dict) -> float:
        return 1.0 if _first_token(completion, r"-?\d+") == sample["answer"] else 0.0


class RetrievalTask:
    """A long list of `key:value` pairs, then a query key; the answer is its value (needle retrieval)."""

    name = "retrieval"

    def __init__(self, num_pairs: int = 32, seed: int = 0):
        if num_pairs < 2:
            raise ValueError(f"RetrievalTask: num_pairs must be >= 2, got {num_pairs}")
        self.num_pairs, self.rng = num_pairs, random.Random(seed)

    def sample(self) -> dict:
        keys = self.rng.sample(range(100, 1000), self.num_pairs)
        vals = [self.rng.randint(10, 99) for _ in keys]
        q = self.rng.randrange(self.num_pairs)
        body = " ".join(f"{k}:{v}" for k, v in zip(keys, vals))
        return {"prompt": f"{body} ? {keys[q]}:", "answer": str(vals[q])}

    @staticmethod
    def reward(prompt: str, completion: str, sample: dict) -> float:
        return 1.0 if _first_token(completion, r"\d+") == sample["answer"] else 0.0


TASKS = {"arithmetic": ArithmeticTask, "retrieval": RetrievalTask}


def load_reward(spec: str) -> RewardFn:
    """"package.module:function" -> the callable (a user-supplied reward)."""
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module} has no callable {name!r}")
    return fn
