"""Rows packed on the fly from a stream of records: a background thread reads records (`sources.open_records`),
tokenises them in batches (the tokenizers library releases the GIL while it encodes) and packs the documents into
rows of `seq_len` exactly as `data.pack_rows` does (documents back to back, EOS after each, the boundaries inside a
row as its pieces; the tail shorter than a row dropped at the end of each pass), into a bounded queue. No shuffling:
rows come in corpus order, pass after pass.

The resumable position is where the next row starts: (epoch, record index, token offset in that record); a resume
skips that many records without tokenising them and drops the offset's tokens. Every rank reads the whole stream
and takes its own rows of each step, so the global row order does not depend on the number of ranks (a checkpoint
resumes on any world size); the cost is that each rank tokenises every row.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from ringlinear.ops.attention import cu_seqlens_from_lens
from ringlinear.train.data import DataError, Encoder


class StreamingDataset:
    """The row interface of `PackedDataset` (`next_row_ids`, `batch`, `labels`, `state_dict`) over a stream."""

    def __init__(self, open_pass: Callable[[], Iterator[dict]], encoder: Encoder, seq_len: int, identity: dict,
                 prefetch_rows: int = 256, encode_batch: int = 64):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.open_pass, self.encoder, self.seq_len = open_pass, encoder, seq_len
        self.prefetch_rows, self.encode_batch = prefetch_rows, encode_batch
        self.identity = "stream:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.position = (0, 0, 0)  # (epoch, record, token offset) where the next row starts
        self.num_rows = None  # unknown for a stream
        self._rows: dict[int, tuple] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_rows)

    # ---- the worker -------------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch_rows)
        self._thread = threading.Thread(target=self._work, args=(self.position, self._stop, self._queue),
                                        name="streaming-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():  # unblock a put on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
            self._thread = None

    def _put(self, stop: threading.Event, q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, start: tuple[int, int, int], stop: threading.Event, q: queue.Queue) -> None:
        try:
            self._pack(start, stop, q)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(stop, q, e)

    def _pack(self, start: tuple[int, int, int], stop: threading.Event, q: queue.Queue) -> None:
        epoch, first, offset = start
        L = self.seq_len
        while not stop.is_set():
            rows_this_pass = 0
            pieces: collections.deque = collections.deque()  # [record, start offset, ids, mask]
            buffered = 0
            records = itertools.islice(self.open_pass(), first, None)  # skipped records are not tokenised
            index = first
            while not stop.is_set():
                chunk = list(itertools.islice(records, self.encode_batch))
                if not chunk:
                    break
                for j, item in enumerate(self.encoder.encode(chunk, index)):
                    if item is None:
                        continue
                    ids, mask = item
                    skip = offset if index + j == first else 0
                    if skip:
                        ids, mask = ids[skip:], (None if mask is None else mask[skip:])
                    if ids:
                        pieces.append([index + j, skip, ids, mask])
                        buffered += len(ids)
                index += len(chunk)
                while buffered >= L:
                    row = self._cut(pieces, L, epoch, index)
                    buffered -= L
                    rows_this_pass += 1
                    if not self._put(stop, q, row):
                        return
            if stop.is_set():
                return
            if rows_this_pass == 0 and first == 0 and offset == 0:
                raise DataError(f"{self.encoder.where}: a whole pass over the data gives fewer tokens than one row "
                                f"of seq_len={L}")
            epoch, first, offset = epoch + 1, 0, 0  # the tail shorter than a row is dropped, as pack_rows does

    @staticmethod
    def _cut(pieces: collections.deque, L: int, epoch: int, next_record: int):
        """One row from the front of `pieces`: (tokens [L], piece lengths, mask [L] or None, position after it)."""
        ids, masks, segs = [], [], []
        need = L
        while need:
            rec, off, pid, pmask = pieces[0]
            take = min(need, len(pid))
            ids.extend(pid[:take])
            if pmask is not None:
                masks.extend(pmask[:take])
            segs.append(take)
            need -= take
            if take == len(pid):
                pieces.popleft()
            else:
                pieces[0] = [rec, off + take, pid[take:], None if pmask is None else pmask[take:]]
        after = (epoch, pieces[0][0], pieces[0][1]) if pieces else (epoch, next_record, 0)
        mask = torch.tensor(masks, dtype=torch.bool) if masks else None
        return torch.tensor(ids, dtype=torch.long), segs, mask, after

    # ---- the consumer -----------------------------------------------------------------------------------------
    def next_row_ids(self, n: int) -> list[int]:
        """The next `n` rows (held until the next call) as ids for `batch` / `labels`."""
        if self._thread is None:
            self._start()
        self._rows = {}
        out = []
        for _ in range(n):
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            tokens, segs, mask, after = item
            self._rows[self._next_id] = (tokens, segs, mask)
            out.append(self._next_id)
            self._next_id += 1
            self.position = after
        return out

    def batch(self, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [n for r in row_ids for n in self._rows[r][1]]
        return torch.cat([self._rows[r][0] for r in row_ids]), cu_seqlens_from_lens(lens)

    def labels(self, row_ids: list[int], cu_seqlens: torch.Tensor) -> torch.Tensor | None:
        if not self.encoder.sft:
            return None
        from ringlinear.model import IGNORE_INDEX, shifted_within

        ids, _ = self.batch(row_ids)
        mask = torch.cat([self._rows[r][2] for r in row_ids])
        return shifted_within(ids, cu_seqlens, 1).masked_fill_(~mask, IGNORE_INDEX)

    def next_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.next_row_ids(n))

    def state_dict(self) -> dict:
        epoch, record, offset = self.position
        return {"stream": self.identity, "epoch": epoch, "record": record, "offset": offset}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream") != self.identity:
            raise ValueError(f"data position was saved for {state.get('stream') or 'an in-memory dataset'}, but this "
                             f"run streams {self.identity}: different data")
        self.close()
        self.position = (state["epoch"], state["record"], state["offset"])
