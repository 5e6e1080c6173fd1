"""Offline RL tasks with verifiable rewards: integer arithmetic and long-context key retrieval.

Each task yields samples `{"prompt": str, "answer": str, ...}` from a seeded generator; its reward is 1.0 when
the first number in the completion equals the answer, else 0.0. Any Python callable
`reward_fn(prompt: str, completion: str, sample: dict) -> float` can stand in (`load_reward("pkg.mod:fn")`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import re
from collections.abc import Callable

from ringlinear.train.data import DataError, read_text_file

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
    """"package.module:function" or "path/to/file.py:function" -> the callable (a user-supplied reward, verl and
    OpenRLHF style). Importing runs the module's code in this process: it is the user's own code, trusted as such.
    Errors name the `reward` field."""
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(f"rl config field reward={spec!r}: must be 'package.module:function'")
    try:
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise FileNotFoundError(f"no file {module}")
            mod_spec = importlib.util.spec_from_file_location(f"ringlinear_user_reward_{abs(hash(module))}", module)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported as the field's error
        raise ValueError(f"rl config field reward={spec!r}: cannot import {module!r}: {e!r}") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"rl config field reward={spec!r}: {module} has no callable {name!r}")
    return _UserReward(fn, spec)


class _UserReward:
    """A reward loaded from the `reward` field: the user's callable, named by that field in errors."""

    def __init__(self, fn: RewardFn, spec: str):
        self.fn, self.spec = fn, spec

    def __call__(self, prompt: str, completion: str, sample: dict) -> float:
        return self.fn(prompt, completion, sample)


def call_reward(fn: RewardFn, prompt: str, completion: str, sample: dict) -> float:
    """fn(prompt, completion, sample) as a finite float; an exception or a non-finite or non-numeric result is an
    error naming the reward (the `reward` field when user-supplied) and the prompt."""
    name = fn.spec if isinstance(fn, _UserReward) else getattr(fn, "__qualname__", repr(fn))
    try:
        r = fn(prompt, completion, sample)
    except Exception as e:  # noqa: BLE001 - re-raised with the field named
        raise RuntimeError(f"rl config field reward={name!r} raised on prompt {prompt[:60]!r}: {e!r}") from e
    try:
        value = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"rl config field reward={name!r} returned {r!r} (not a number) on prompt "
                         f"{prompt[:60]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"rl config field reward={name!r} returned {value} (must be finite) on prompt "
                         f"{prompt[:60]!r}")
    return value


class PromptDataset:
    """Prompts from a JSON-lines file or a `datasets.save_to_disk` directory, drawn in a seeded shuffled order
    (reshuffled each pass). `sample()` gives the record with "prompt" (the text the reward sees) and, with a chat
    template, "prompt_ids" (the rendered conversation's token ids, what the engine computes); a record's
    `prompt_key` holds a string or a list of {"role", "content"} messages."""

    name = "prompts"

    def __init__(self, path: str, prompt_key: str = "prompt", seed: int = 0, tokenizer=None,
                 chat_template: str | None = None):
        self.records = read_prompt_records(path, prompt_key)
        self.prompt_key, self.tokenizer, self.template = prompt_key, tokenizer, chat_template
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def sample(self) -> dict:
        if not self.order:
            self.order = list(range(len(self.records)))
            self.rng.shuffle(self.order)
        rec = dict(self.records[self.order.pop()])
        prompt = rec[self.prompt_key]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.template is not None:
            from ringlinear.chat_template import encode_chat

            rec["prompt_ids"] = encode_chat(self.tokenizer, self.template, messages)
        rec["prompt"] = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
        return rec

    reward = None  # prompts come with no reward of their own: `RLConfig.reward` names one


def read_prompt_records(path: str, prompt_key: str) -> list[dict]:
    """The records of a JSON-lines file or a saved HF dataset directory; errors name the `prompts` field."""
    where = f"rl config field prompts={path!r}"
    if os.path.isdir(path):
        try:
            import datasets

            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where}: not a dataset saved with save_to_disk ({e!r})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{where}: a DatasetDict without a 'train' split ({sorted(ds)})")
            ds = ds["train"]
        records = [dict(r) for r in ds]
    elif os.path.isfile(path):
        records = []
        try:
            text = read_text_file(path)
        except DataError as e:  # not UTF-8: named by file, byte and line
            raise ValueError(f"{where}: {e}") from None
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: line {n} is not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: line {n} is not a JSON object")
            records.append(rec)
    else:
        raise ValueError(f"{where}: no such file or directory")
    if not records:
        raise ValueError(f"{where}: no records")
    for n, rec in enumerate(records):
        p = rec.get(prompt_key)
        ok = (isinstance(p, str) and p) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in p))
        if not ok:
            raise ValueError(f"{where}: record {n} has no usable {prompt_key!r} (a non-empty string or a list of "
                             "{'role', 'content'} messages); see prompt_key")
    return records
