"""Packed pre-training data: documents tokenised with the checkpoint's tokenizer, an EOS after each,
concatenated and cut into fixed-length rows; document boundaries inside a row become `cu_seqlens`
(varlen attention never crosses documents). Row order is a seeded permutation per epoch, and the
position (epoch, row) is the resumable state. An optional per-token loss mask says which next-token targets
count (e.g. only the answers of a synthetic recall sequence, whose keys and values are random).
"""

from __future__ import annotations

import bisect
import os

import torch

from ringlinear.ops.attention import cu_seqlens_from_lens


class DataError(ValueError):
    """The training data cannot be used as given; the message names the file (or dataset) and what is wrong."""


def read_text_file(path: str) -> str:
    """A training text file's contents; a missing or non-UTF-8 file is refused naming the file, byte and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"training data file {path} is not UTF-8 text: byte {e.start} (line {line}) "
                        f"{raw[e.start:e.end]!r}: {e.reason}; convert it (e.g. iconv -t UTF-8)") from None


def read_documents(paths: list[str], separator: str | None = "\n\n\n") -> list[str]:
    """Plain text files (each split into documents at `separator`; None = one document per file), or a
    HF `datasets` dataset saved with `save_to_disk` (a directory; its "text" column)."""
    docs: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                import datasets
            except ImportError:
                raise DataError(f"{path} is a directory: reading a saved HF dataset needs `datasets` installed") from None
            ds = datasets.load_from_disk(path)
            if "text" not in ds.column_names:
                raise DataError(f"{path}: the dataset has no 'text' column (columns: {ds.column_names})")
            docs.extend(t for t in ds["text"] if t)
            continue
        text = read_text_file(path)
        parts = text.split(separator) if separator else [text]
        docs.extend(p for p in parts if p.strip())
    if not docs:
        raise DataError(f"no documents found in {paths}")
    return docs


def tokenize_documents(docs: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    """Each document -> its token ids followed by EOS (so the model learns where documents end)."""
    return [enc.ids + [eos_id] for enc in tokenizer.encode_batch(docs, add_special_tokens=False)]


def pack_rows(docs: list[list[int]], seq_len: int, masks: list[list[bool]] | None = None):
    """Concatenate documents and cut into rows of `seq_len` tokens (the tail shorter than a row is dropped).
    Returns (tokens [R, seq_len] int64, per row the lengths of its document pieces, summing to seq_len), and
    with `masks` (per document, one bool per token: is the target after this token trained on) also the
    packed mask [R, seq_len] bool."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if masks is not None and [len(m) for m in masks] != [len(d) for d in docs]:
        raise ValueError("pack_rows: masks must hold one bool per token of each document")
    flat: list[int] = []
    flat_mask: list[bool] = []
    bounds: list[int] = []  # token offsets where a new document starts
    for i, d in enumerate(docs):
        bounds.append(len(flat))
        flat.extend(d)
        if masks is not None:
            flat_mask.extend(masks[i])
    R = len(flat) // seq_len
    if R == 0:
        raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one row of seq_len={seq_len}")
    starts = sorted(set(bounds))
    seg_lens: list[list[int]] = []
    j = 0
    for r in range(R):
        lo, hi = r * seq_len, (r + 1) * seq_len
        while j < len(starts) and starts[j] <= lo:
            j += 1
        k = bisect.bisect_left(starts, hi, lo=j)  # the starts inside this row: starts[j:k]
        cuts = [lo, *starts[j:k], hi]
        seg_lens.append([b - a for a, b in zip(cuts[:-1], cuts[1:])])
    tokens = torch.tensor(flat[: R * seq_len], dtype=torch.long).view(R, seq_len)
    if masks is None:
        return tokens, seg_lens
    return tokens, seg_lens, torch.tensor(flat_mask[: R * seq_len], dtype=torch.bool).view(R, seq_len)


class PackedDataset:
    """Rows of `seq_len` tokens served in a deterministic, resumable order.

    `next_rows(n)` returns the next `n` rows packed as one varlen batch: input_ids [n * seq_len] and
    cu_seqlens [S+1] int32 over all document pieces of those rows."""

    def __init__(self, tokens: torch.Tensor, seg_lens: list[list[int]], seed: int = 0, shuffle: bool = True,
                 loss_mask: torch.Tensor | None = None):
        if loss_mask is not None and loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must match tokens {tuple(tokens.shape)}")
        self.tokens, self.seg_lens, self.loss_mask = tokens, seg_lens, loss_mask
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def identity(self) -> str:
        """What a checkpoint's data position refers to (part of the run's fingerprint)."""
        return f"rows:{self.num_rows}"

    def close(self) -> None:
        """Nothing runs in the background here (`StreamingDataset` has a worker to stop)."""

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_rows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=g)

    def rewind(self) -> None:
        """Back to the first row of epoch 0 (the order a fresh dataset with this seed has)."""
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def next_row_ids(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.index >= self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(int(self._order[self.index]))
            self.index += 1
        return out

    def batch(self, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> (input_ids [n*seq_len] int64, cu_seqlens [S+1] int32)."""
        lens = [n for r in row_ids for n in self.seg_lens[r]]
        return self.tokens[row_ids].reshape(-1), cu_seqlens_from_lens(lens)

    def labels(self, row_ids: list[int], cu_seqlens: torch.Tensor) -> torch.Tensor | None:
        """Next-token labels of `batch(row_ids)` with masked-out targets set to IGNORE_INDEX, or None when the
        dataset has no loss mask (the model then shifts the ids itself)."""
        if self.loss_mask is None:
            return None
        from ringlinear.model import IGNORE_INDEX, shifted_within

        labels = shifted_within(self.tokens[row_ids].reshape(-1), cu_seqlens, 1)
        return labels.masked_fill_(~self.loss_mask[row_ids].reshape(-1), IGNORE_INDEX)

    def next_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.next_row_ids(n))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if "num_rows" not in state:
            raise ValueError("data position was saved for a streamed dataset, but this run packs its data up front: "
                             "different data")
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(f"data position was saved for {state['num_rows']} rows / seed {state['seed']}, "
                             f"but this dataset has {self.num_rows} rows / seed {self.seed}: different data")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._make_order()


class Encoder:
    """Records -> (token ids, per-token loss mask or None). Pre-training: `text_field`, then EOS; the documents the
    field is empty in are skipped (None). SFT: `prompt` ids + `response` ids + EOS, and the mask says which
    next-token targets count: those inside the response and the EOS (pack_rows' convention: mask[i] is about
    the target after token i)."""

    def __init__(self, tokenizer, eos_id: int, text_field: str = "text", sft: bool = False, where: str = "data"):
        self.tokenizer, self.eos_id, self.text_field, self.sft, self.where = tokenizer, eos_id, text_field, sft, where

    def _field(self, rec: dict, name: str, index: int):
        if not isinstance(rec, dict) or name not in rec:
            have = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{self.where}: record {index} has no {name!r} field (it has {have})")
        value = rec[name]
        if value is None:  # JSON lines read by `datasets` fill a field a record lacks with null
            raise DataError(f"{self.where}: record {index} has no {name!r} (missing or null)")
        if not isinstance(value, str):
            raise DataError(f"{self.where}: record {index} field {name!r} must be a string, got "
                            f"{type(value).__name__}")
        return value

    def encode(self, records: list[dict], first_index: int) -> list[tuple[list[int], list[bool] | None] | None]:
        enc = self.tokenizer.encode_batch
        if not self.sft:
            texts = [self._field(r, self.text_field, first_index + i) for i, r in enumerate(records)]
            keep = [i for i, t in enumerate(texts) if t.strip()]
            out: list = [None] * len(texts)
            for i, e in zip(keep, enc([texts[i] for i in keep], add_special_tokens=False)):
                out[i] = (e.ids + [self.eos_id], None)
            return out
        prompts = [self._field(r, "prompt", first_index + i) for i, r in enumerate(records)]
        responses = [self._field(r, "response", first_index + i) for i, r in enumerate(records)]
        out = []
        for p, r in zip(enc(prompts, add_special_tokens=False), enc(responses, add_special_tokens=False)):
            ids = p.ids + r.ids + [self.eos_id]
            # token i predicts token i+1: trained when i+1 is a response token or the EOS
            mask = [i + 1 >= len(p.ids) for i in range(len(ids))]
            out.append((ids, mask))
        return out
