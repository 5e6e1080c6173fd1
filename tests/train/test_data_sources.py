"""Training data: the streamed rows are `pack_rows`' rows (document boundaries, epochs, dropped tails) and resume at
the exact record and token; JSON lines / Parquet / CSV (HF datasets, streaming) and saved datasets give the same
documents as text files; SFT masks the loss on the prompt, from the CLI; bad records are named; a streamed run
resumes bit for bit; every step is logged to TensorBoard."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ringlinear.cli import main as cli_main
from ringlinear.model import IGNORE_INDEX
from ringlinear.tokenizer import byte_level_tokenizer
from ringlinear.train.data import DataError, Encoder, PackedDataset, pack_rows
from ringlinear.train.sources import open_records, read_all
from ringlinear.train.streaming import StreamingDataset
from ringlinear.train.trainer import TrainConfig, Trainer

EOS = 257
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 5) for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text("\n\n\n".join(DOCS))
    with open(d / "corpus.jsonl", "w") as f:
        for i, t in enumerate(DOCS):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS})
    ds.to_parquet(str(d / "corpus.parquet"))
    ds.to_csv(str(d / "corpus.csv"), index=False)
    ds.save_to_disk(str(d / "saved"))
    with open(d / "sft.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"Q{i}: what is {i} + {i}?", "response": f" {2 * i}"}) + "\n")
    return d


def _stream(path, tok, seq_len, fmt="auto", sft=False, **kw):
    enc = Encoder(tok, EOS, sft=sft, where=str(path))
    return StreamingDataset(open_records([str(path)], fmt, "\n\n\n"), enc, seq_len, {"p": str(path)}, **kw)


def _packed(path, tok, seq_len, fmt="auto"):
    docs, _ = read_all(open_records([str(path)], fmt, "\n\n\n"), Encoder(tok, EOS, where=str(path)))
    return PackedDataset(*pack_rows(docs, seq_len), shuffle=False)


@pytest.mark.parametrize("seq_len", [7, 64, 333])
def test_streamed_rows_are_pack_rows_rows_across_epochs(files, tok, seq_len):
    ref = _packed(files / "corpus.txt", tok, seq_len)
    n = ref.num_rows * 2 + 3  # more than two passes
    s = _stream(files / "corpus.txt", tok, seq_len, prefetch_rows=5, encode_batch=3)
    for _ in range(3):
        k = n // 3
        want_ids, want_cu = ref.next_rows(k)
        got_ids, got_cu = s.next_rows(k)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_cu, want_cu)
    s.close()


def test_stream_resumes_at_the_record_and_token(files, tok):
    ref = _stream(files / "corpus.txt", tok, 50)
    a = _stream(files / "corpus.txt", tok, 50)
    for take in (3, 11, 45):  # stop mid-document, then past the end of a pass
        a.next_rows(take)
        ref.next_rows(take)
        state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint holds
        a.close()
        a = _stream(files / "corpus.txt", tok, 50)
        a.load_state_dict(state)
        got, want = a.next_rows(4), ref.next_rows(4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), state
    assert state["epoch"] >= 1 and state["offset"] > 0
    with pytest.raises(ValueError, match="different data"):
        _stream(files / "corpus.jsonl", tok, 50).load_state_dict(state | {"stream": "stream:other"})
    a.close()
    ref.close()


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.parquet", "corpus.csv", "saved"])
def test_hf_formats_give_the_text_files_rows(files, tok, name):
    want = _packed(files / "corpus.txt", tok, 64).next_rows(8)
    got = _packed(files / name, tok, 64).next_rows(8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = _stream(files / name, tok, 64)
    got = s.next_rows(8)
    s.close()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_sft_masks_the_prompt(files, tok):
    s = _stream(files / "sft.jsonl", tok, 40, sft=True)
    rows = s.next_row_ids(3)
    ids, cu = s.batch(rows)
    labels = s.labels(rows, cu)
    s.close()
    # the first example: its trained targets are the response's tokens and the EOS, nothing of the prompt
    p = tok.encode("Q0: what is 0 + 0?", add_special_tokens=False).ids
    r = tok.encode(" 0", add_special_tokens=False).ids
    n = len(p) + len(r) + 1
    assert ids[:n].tolist() == p + r + [EOS]
    trained = [int(t) for t in labels[:n] if t != IGNORE_INDEX]
    assert trained == r + [EOS]
    # packed up front: the same labels
    docs, masks = read_all(open_records([str(files / "sft.jsonl")], "auto", None), Encoder(tok, EOS, sft=True))
    tokens, segs, mask = pack_rows(docs, 40, masks)
    ds = PackedDataset(tokens, segs, shuffle=False, loss_mask=mask)
    r0 = ds.next_row_ids(3)
    assert torch.equal(ds.labels(r0, ds.batch(r0)[1]), labels)


@pytest.mark.parametrize("record, needle", [({"prompt": "x"}, "record 1 has no 'response'"),
                                            ({"prompt": "x", "response": 3}, "record 1 field 'response' must be a string")])
def test_bad_sft_records_are_named(tmp_path, tok, record, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=needle):
        read_all(open_records([str(path)], "auto", None), Encoder(tok, EOS, sft=True, where=str(path)))
    s = _stream(path, tok, 8, sft=True)
    with pytest.raises(DataError, match=needle):  # raised by the worker, re-raised where rows are asked for
        s.next_rows(1)


def test_streaming_worker_errors_reach_the_trainer(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\n\n\xff\xfe broken")
    s = _stream(bad, tok, 4)
    with pytest.raises(DataError, match="not UTF-8"):
        s.next_rows(3)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(DataError, match="fewer tokens than one row"):
        _stream(tiny, tok, 64).next_rows(1)


def _cfg(files, **kw):
    base = dict(model="tiny", model_overrides={"num_hidden_layers": 2}, data=[str(files / "corpus.jsonl")],
                seq_len=32, micro_batch=2, steps=5, lr=3e-3, warmup_steps=1, progress=False, plot=False,
                export=False, deterministic=True, streaming=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_streamed_training_resumes_bit_for_bit_and_logs_to_tensorboard(files, tmp_path, deterministic):
    full = Trainer(_cfg(files, save_dir=str(tmp_path / "a"))).fit()
    part = Trainer(_cfg(files, save_dir=str(tmp_path / "b"), save_every=2, tensorboard=False))
    part.fit(stop_after=3)
    resumed = Trainer(_cfg(files, save_dir=str(tmp_path / "b"), resume=True, tensorboard=False))
    assert resumed.step == 2
    assert [h["loss"] for h in resumed.fit()] == [h["loss"] for h in full]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    ea.Reload()
    logged = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5]
    assert all(abs(v - h["loss"]) < 1e-6 * abs(v) for (_, v), h in zip(logged, full))
    assert "moe/cv" in ea.Tags()["scalars"]


def test_sft_from_the_cli(files, tmp_path, capsys):
    out = tmp_path / "sft"
    code = cli_main(["train", "--model", "tiny", "--set", 'model_overrides={"num_hidden_layers": 2}', "--data",
                     str(files / "sft.jsonl"), "--sft", "--seq-len", "32", "--micro-batch", "2", "--steps", "2",
                     "--no-progress", "--no-plot", "--no-export", "--save-dir", str(out)])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 2 and 0 < last["targets"] < 2 * 32  # the prompts' targets are not counted
    assert os.path.exists(out / "history.json")
