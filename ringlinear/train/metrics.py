"""Where the training records go: `history.json` (strict JSON: a non-finite number, such as the max/min expert
load ratio when an expert got no token, or a NaN loss, is written as null, which every JSON reader accepts)."""

from __future__ import annotations

import json
import math
import os

from ringlinear.files import fsync_dir


def json_safe(value):
    """`value` with every non-finite float replaced by None (json.dump would write Infinity / NaN, which are not
    JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_history(path: str, history: list[dict]) -> None:
    """The step records as strict JSON (non-finite numbers as null), replacing `path` atomically."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")  # what `remove_interrupted` removes after a kill
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(history), f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(parent)
