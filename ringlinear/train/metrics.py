"""Where the training records go: `history.json` (strict JSON: a non-finite number, such as the max/min expert
load ratio when an expert got no token, or a NaN loss, is written as null, which every JSON reader accepts), and
each step to TensorBoard and W&B (`MetricsLogger`)."""

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


class MetricsLogger:
    """Each step's record to TensorBoard (`{save_dir}/tensorboard`, when `tensorboard` is on and the package is
    installed) and to Weights & Biases (when `wandb_project` is set), beside history.json. Rank 0 only; the
    numbers are logged as they are (TensorBoard and W&B take infinities)."""

    def __init__(self, save_dir: str | None, tensorboard: bool, wandb_project: str | None, config: dict):
        self.tb = self.wandb = None
        if tensorboard and save_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                import warnings

                warnings.warn("tensorboard is on but the `tensorboard` package is not installed (pip install "
                              "'ringlinear[train]'): no TensorBoard logs", stacklevel=3)
            else:
                self.tb = SummaryWriter(os.path.join(save_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(f"train config field wandb_project={wandb_project!r}: W&B logging needs the `wandb` "
                                 "package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=save_dir)

    def log(self, rec: dict) -> None:
        step = rec["step"]
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
