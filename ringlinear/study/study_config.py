"""`StudyConfig`: the hybrid-ratio study's settings (`ringlinear study ratio`; every field a `--field` flag): the
model family (widths, layers, ratios), the training budget, and the recall task. Why the defaults are what they
are (init, dtype, key counts) is in benchmarks/NOTES_study.md."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import ClassVar

from ringlinear.config_base import ConfigBase
from ringlinear.files import sha256_file

RECALL_FIRST_TOKEN = 260  # after the byte-level vocabulary (256 bytes + 4 specials)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return "sha256:" + sha256_file(path)


def corpus_digest(path: str) -> str:
    """'sha256:...' of a file's content (cached by path, size and modification time)."""
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@dataclass
class StudyConfig(ConfigBase):
    _where: ClassVar[str] = "study"
    # fields that do not change a run's result
    _NOT_SETUP: ClassVar[tuple[str, ...]] = ("out", "group_sizes", "widths", "save_every", "jobs", "eval_every")

    corpus: str = ""
    """UTF-8 text file of the text part of the training data."""
    out: str = "runs/ratio-study"
    """Study folder: one JSON per finished run, checkpoints, logs, table and plots."""
    group_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 0])
    """layer_group_size values (1 = all softmax, 0 = all linear, M = M-1 linear layers per softmax layer)."""
    widths: list[int] = field(default_factory=lambda: [64, 128])
    """Model widths (hidden sizes), multiples of 32."""
    num_layers: int = 8
    """Layers of every model."""
    steps: int = 150
    """Training steps of every model."""
    seq_len: int = 256
    """Tokens per training row."""
    micro_batch: int = 8
    """Rows per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    recall_keys: int = 32
    """Distinct keys of the recall task."""
    recall_values: int = 0
    """Distinct values (0: as many as keys)."""
    head_dim: int = 32
    """Per-head q/k/v width: smaller leaves the linear layers less state (heads x head_dim key directions)."""
    heads: int = 0
    """Query heads per layer (0: width // 32, at least 2; KV heads are half); more heads give the linear layers
    faster-decaying heads."""
    recall_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Key-value pairs per recall sequence, trained on and evaluated at (context 2P + 2Q tokens)."""
    recall_eval_pairs: list[int] = field(default_factory=list)
    """Pair counts only evaluated, never trained on: does recall hold with more pairs than training showed?"""
    recall_queries: int = 8
    """Queries Q per recall sequence."""
    recall_fraction: float = 0.4
    """Share of training tokens in recall sequences."""
    recall_loss: str = "answers"
    """Targets trained in recall sequences: "answers" (the value after each query, as MQAR) or "all"."""
    recall_rows: int = 64
    """Evaluation sequences per context length."""
    eval_fraction: float = 0.05
    """Share of text documents held out for the text loss."""
    cost_context: int = 32768
    """Context at which the decode cost per token is reported."""
    init_std: float = 0.0
    """Std of projection weights at init; 0: sqrt(2 / (5 * width)) (small init)."""
    embedding_init_std: float = 1.0
    """Std of the input embeddings at init."""
    compute_dtype: str = "fp32"
    """Training compute dtype: "fp32" (default on every device) or "bf16"."""
    seed: int = 0
    """Seed of data and initial weights."""
    save_every: int = 0
    """Checkpoint each run every N steps to resume mid-run (0: whole runs only)."""
    eval_every: int = 0
    """Measure recall every N steps (the recall-vs-step curve in each run's JSON and plot); 0: at the end."""
    jobs: int = 1
    """Models trained at once (processes; useful on a GPU)."""

    def __post_init__(self) -> None:
        # types at construction; the rules between fields when a study starts (`validate`): the tools also build
        # partial configs (one width, a few keys) to describe a single model
        self.check_types()

    def setup(self) -> dict:
        """What a run's result depends on. The corpus counts by its content, not its path: a study folder moved
        (its builtin corpus lives inside it) or a copy of the corpus elsewhere still resumes and combines."""
        d = {k: v for k, v in self.to_dict().items() if k not in self._NOT_SETUP}
        if os.path.isfile(self.corpus):
            d["corpus"] = corpus_digest(self.corpus)
        return d

    def validate(self) -> None:
        super().validate()
        need = self.require
        for name in ("group_sizes", "widths", "recall_pairs"):
            need(bool(getattr(self, name)), name, "needs at least one value")
        need(self.recall_values >= 0, "recall_values", "must be >= 0 (0: as many as recall_keys)")
        for name in ("num_layers", "steps", "seq_len", "micro_batch", "recall_keys", "recall_queries", "recall_rows",
                     "jobs"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0 (0: no mid-run checkpoints)")
        need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: recall at the end only)")
        need(all(0 <= g <= self.num_layers for g in self.group_sizes), "group_sizes",
             f"each must be in 0..num_layers={self.num_layers} (1 = all softmax, 0 = all linear, M = M-1 linear "
             "layers per softmax layer)")
        need(all(w >= 32 and w % 32 == 0 for w in self.widths), "widths", "each must be a multiple of 32 and >= 32")
        need(self.heads >= 0 and self.heads % 2 == 0, "heads", "must be 0 (width // 32) or an even count (KV heads "
                                                               "are half)")
        need(self.head_dim >= 16 and self.head_dim % 16 == 0, "head_dim",
             "must be a multiple of 16 (the kernels' smallest tile)")
        for name in ("recall_pairs", "recall_eval_pairs"):
            need(all(1 <= p <= self.recall_keys for p in getattr(self, name)), name,
                 f"each must lie in 1..recall_keys={self.recall_keys}")
        # positions past seq_len are never trained (RoPE): recall there would measure that, not the state
        need(2 * max(self.eval_pairs) + 2 * self.recall_queries <= self.seq_len, "seq_len",
             f"must hold the longest recall sequence ({2 * max(self.eval_pairs) + 2 * self.recall_queries} tokens)")
        need(0 < self.recall_fraction < 1, "recall_fraction", "must be in (0, 1)")
        need(self.init_std >= 0, "init_std", "must be >= 0 (0: sqrt(2/(5*width)))")
        need(self.embedding_init_std > 0, "embedding_init_std", "must be > 0")
        need(self.compute_dtype in ("fp32", "bf16"), "compute_dtype", "must be 'fp32' or 'bf16'")
        need(self.recall_loss in ("answers", "all"), "recall_loss", "must be 'answers' or 'all'")
        need(0 < self.eval_fraction < 0.5, "eval_fraction", "must be in (0, 0.5)")

    @property
    def eval_pairs(self) -> list[int]:
        """Pair counts recall is measured at: the trained ones and the eval-only ones, ascending."""
        return sorted(set(self.recall_pairs) | set(self.recall_eval_pairs))

    @property
    def num_values(self) -> int:
        return self.recall_values or self.recall_keys

    @property
    def vocab_size(self) -> int:
        return RECALL_FIRST_TOKEN + self.recall_keys + self.num_values

    def label(self, g: int) -> str:
        if g == 0:
            return "all linear"
        if g == 1:
            return "all softmax"
        return f"1:{g - 1}"
