"""Where training documents come from and how they become token ids: plain text files (split at a separator),
Hugging Face `datasets` (a directory saved with `save_to_disk`, or local JSON lines / Parquet / CSV files read in
streaming mode), as records (dicts); pre-training documents (a text column, an EOS after each) or SFT examples
(`prompt` + `response`, the loss masked on the prompt). Every error names the file or dataset and the record.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

from ringlinear.train.data import DataError, Encoder, read_text_file

FORMATS = ("auto", "text", "json", "parquet", "csv", "dataset")
_BY_EXTENSION = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_format(paths: list[str], data_format: str) -> str:
    """The one format of `paths` ("auto": a directory is a saved dataset, .jsonl/.json JSON lines, .parquet,
    .csv, anything else plain text); mixed formats are refused."""
    if data_format != "auto":
        return data_format
    kinds = set()
    for p in paths:
        if os.path.isdir(p):
            kinds.add("dataset")
        else:
            kinds.add(_BY_EXTENSION.get(os.path.splitext(p)[1].lower(), "text"))
    if len(kinds) != 1:
        raise DataError(f"data {paths} mixes formats {sorted(kinds)}: give files of one format (or set data_format)")
    return kinds.pop()


def _text_records(paths: list[str], separator: str | None) -> Iterator[dict]:
    for path in paths:
        text = read_text_file(path)
        for part in text.split(separator) if separator else [text]:
            if part.strip():
                yield {"text": part}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading JSON / Parquet / CSV files or saved datasets needs the `datasets` package "
                        "(pip install 'ringlinear[train]')") from None
    return datasets


def _hf_records(paths: list[str], fmt: str) -> Iterator[dict]:
    datasets = _datasets()
    if fmt == "dataset":
        for path in paths:
            try:
                ds = datasets.load_from_disk(path)
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"{path} is not a dataset saved with save_to_disk ({e})") from None
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path} holds splits {sorted(ds)}, none named 'train'")
                ds = ds["train"]
            yield from ds
        return
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training data file {path} does not exist")
    # streaming: records are read as they are needed, never the whole corpus into memory or a cache
    ds = datasets.load_dataset(fmt, data_files=list(paths), split="train", streaming=True)
    try:
        yield from ds
    except Exception as e:  # noqa: BLE001 - pyarrow/json errors do not say which file
        raise DataError(f"cannot read {fmt} data {paths}: {type(e).__name__}: {str(e)[:300]}") from None


def open_records(paths: list[str], data_format: str, separator: str | None) -> Callable[[], Iterator[dict]]:
    """A function that starts a fresh pass over the records of `paths` (called once per epoch)."""
    fmt = resolve_format(paths, data_format)
    if fmt == "text":
        return lambda: _text_records(paths, separator)
    return lambda: _hf_records(paths, fmt)


def read_all(open_pass: Callable[[], Iterator[dict]], encoder: Encoder, batch: int = 256):
    """Every document of one pass, encoded: (list of ids, list of masks or None)."""
    docs, masks = [], []
    it = open_pass()
    index = 0
    while chunk := list(itertools.islice(it, batch)):
        for item in encoder.encode(chunk, index):
            if item is not None:
                docs.append(item[0])
                masks.append(item[1])
        index += len(chunk)
    if not docs:
        raise DataError(f"{encoder.where}: no documents found")
    return docs, (masks if encoder.sft else None)


def dataset_for(cfg, tokenizer, eos_id: int):
    """The training rows `cfg` (a TrainConfig) asks for: all documents tokenised up front and packed
    (`PackedDataset`, shuffled per epoch), or packed on the fly by a background worker (`streaming`)."""
    from ringlinear.train.data import PackedDataset, pack_rows

    if tokenizer is None:
        raise DataError(f"model {cfg.model!r} has no tokenizer: give a directory with tokenizer.json (`tokenizer`)")
    fmt = resolve_format(cfg.data, cfg.data_format)
    where = f"data {cfg.data[0] if len(cfg.data) == 1 else cfg.data} ({fmt})"
    encoder = Encoder(tokenizer, eos_id, cfg.text_field, cfg.sft, where)
    open_pass = open_records(cfg.data, fmt, cfg.doc_separator)
    if cfg.streaming:
        from ringlinear.train.streaming import StreamingDataset

        identity = {"data": [os.path.abspath(p) for p in cfg.data], "format": fmt, "text_field": cfg.text_field,
                    "sft": cfg.sft, "separator": cfg.doc_separator, "seq_len": cfg.seq_len}
        return StreamingDataset(open_pass, encoder, cfg.seq_len, identity)
    docs, masks = read_all(open_pass, encoder)
    packed = pack_rows(docs, cfg.seq_len, masks)
    return PackedDataset(packed[0], packed[1], seed=cfg.seed, shuffle=cfg.shuffle,
                         loss_mask=packed[2] if masks is not None else None)
