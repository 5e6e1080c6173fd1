"""Training under hostile input (issue 27, item 7): leftovers of killed saves are removed, resume falls back to the
newest intact checkpoint, bad files and fields end in one message naming them (through `ringlinear train`),
checkpoint indexes cannot point outside their directory, training state never unpickles objects, history.json
is strict JSON, and a run killed (-9) during saves again and again resumes onto the uninterrupted losses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ringlinear.cli import main as cli_main
from ringlinear.config_base import field_docs
from ringlinear.hf import INDEX_FILE, CheckpointError, read_weight_map, save_model
from ringlinear.model import init_model
from ringlinear.train import state as ckpt
from ringlinear.train.trainer import TrainConfig, Trainer

SMALL = {"num_hidden_layers": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = [f"the quick brown fox {i % 7} jumps over the lazy dog. " * (1 + i % 3) for i in range(60)]
    path = d / "corpus.txt"
    path.write_text("\n\n\n".join(docs))
    return str(path)


def _cfg(corpus, **kw):
    base = dict(model="tiny", data=[corpus], seq_len=32, micro_batch=2, steps=3, lr=3e-3, warmup_steps=1,
                progress=False, plot=False, export=False, model_overrides=SMALL)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _leftovers(save_dir) -> list[str]:
    return sorted(n for n in os.listdir(save_dir) if ".tmp-" in n or ".old-" in n)


# ---- leftovers of interrupted saves -------------------------------------------------------------------------
def test_interrupted_saves_are_cleaned_on_resume_and_at_the_next_save(corpus, tmp_path):
    save = tmp_path / "run"
    Trainer(_cfg(corpus, steps=2, save_dir=str(save), save_every=1)).fit()
    assert [s for s, _ in ckpt.list_checkpoints(str(save))] == [1, 2]
    # what kill -9 leaves: a half-written checkpoint, a half-written export, a history temp file, and a
    # checkpoint moved aside by a replacement that never got renamed in (restored, not deleted)
    (save / ".step-00000003.tmp-k1l2").mkdir()
    (save / ".step-00000003.tmp-k1l2" / "train_state.pt").write_bytes(b"\x80half")
    (save / ".final.tmp-zz").mkdir()
    (save / ".history.json.tmp-4242").write_text("[")
    os.rename(save / "step-00000002", save / ".step-00000002.old-abcd")
    with pytest.warns(UserWarning, match="interrupted"):
        tr = Trainer(_cfg(corpus, steps=4, save_dir=str(save), save_every=1, resume=True))
    assert _leftovers(save) == []
    assert tr.step == 2  # the restored step-2 checkpoint is the newest
    # a leftover that appears later (another tool, a crashed export) goes at the next save
    (save / ".step-00000009.tmp-late").mkdir()
    tr.fit()
    assert _leftovers(save) == [] and [s for s, _ in ckpt.list_checkpoints(str(save))] == [3, 4]


def test_a_second_trainer_on_the_same_save_dir_is_refused(corpus, tmp_path):
    first = Trainer(_cfg(corpus, save_dir=str(tmp_path / "run")))
    with pytest.raises(ckpt.TrainCheckpointError, match="in use by another training process"):
        Trainer(_cfg(corpus, save_dir=str(tmp_path / "run")))
    first.fit()  # releases the directory
    Trainer(_cfg(corpus, save_dir=str(tmp_path / "run"))).close()


# ---- resume falls back to the newest intact checkpoint ------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip_byte", "no_manifest", "bad_manifest", "missing_shard", "bad_meta"])
def test_resume_skips_a_corrupt_newest_checkpoint(corpus, tmp_path, damage):
    save = str(tmp_path / "run")
    Trainer(_cfg(corpus, steps=3, save_dir=save, save_every=1, keep_checkpoints=3)).fit()
    newest = ckpt.step_dir(save, 3)
    shard = os.path.join(newest, "__0_0.distcp")
    if damage == "flip_byte":
        with open(shard, "r+b") as f:
            f.seek(300)
            b = f.read(1)
            f.seek(300)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "no_manifest":
        os.remove(os.path.join(newest, ckpt.MANIFEST))
    elif damage == "bad_manifest":
        with open(os.path.join(newest, ckpt.MANIFEST), "w") as f:
            f.write('{"format": "ringlinear-train-v2", "sha256": ')
    elif damage == "missing_shard":
        os.remove(shard)
    else:
        with open(os.path.join(newest, ckpt.META_FILE), "a") as f:
            f.write("garbage")
    with pytest.warns(UserWarning) as rec:
        tr = Trainer(_cfg(corpus, steps=4, save_dir=save, resume=True))
    msgs = [str(w.message) for w in rec]
    assert any("skipped" in m and "step-00000003" in m for m in msgs), msgs
    assert any("using" in m and "step-00000002" in m for m in msgs), msgs
    assert tr.step == 2
    tr.close()


def test_resume_with_every_checkpoint_corrupt_names_each(corpus, tmp_path):
    save = str(tmp_path / "run")
    Trainer(_cfg(corpus, steps=2, save_dir=save, save_every=1)).fit()
    for _, path in ckpt.list_checkpoints(save):
        os.remove(os.path.join(path, ckpt.MANIFEST))
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint.*step-00000002.*step-00000001"):
        Trainer(_cfg(corpus, steps=3, save_dir=save, resume=True))


# ---- no unpickling of arbitrary objects ------------------------------------------------------------------
class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file: code run by loading a checkpoint
        return (open, (self.marker, "w"))


def _reseal(path: str, fname: str) -> None:
    """Fix the manifest's checksum of `fname`, as an attacker who can write the checkpoint can."""
    manifest = json.loads(open(os.path.join(path, ckpt.MANIFEST)).read())
    manifest["sha256"][fname] = ckpt.sha256_file(os.path.join(path, fname))
    with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
        json.dump(manifest, f)


def test_training_state_loads_without_unpickling_objects(corpus, tmp_path):
    """The only pickle in a checkpoint, DCP's .metadata, is read with an allow-list: a planted object is refused
    before it runs; the plain state is JSON and the tensors are read with weights_only."""
    import pickle

    save = str(tmp_path / "run")
    Trainer(_cfg(corpus, steps=1, save_dir=save)).fit()
    (_, path), = ckpt.list_checkpoints(save)
    marker = str(tmp_path / "pwned")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Planted(marker), f)
    _reseal(path, ".metadata")
    with pytest.raises(ckpt.TrainCheckpointError, match="io.open is not allowed in checkpoint metadata"):
        Trainer(_cfg(corpus, steps=2, save_dir=save, resume=True))
    assert not os.path.exists(marker)


# ---- checkpoint index paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", "", ".", 7])
def test_weight_map_entries_must_stay_inside_the_checkpoint(tmp_path, entry):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / INDEX_FILE).write_text(json.dumps({"weight_map": {"model.norm.weight": entry}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        read_weight_map(str(ck))


def test_weight_map_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside.safetensors", ck / "model-00001-of-00001.safetensors")
    (ck / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_weight_map(str(ck))
    (ck / INDEX_FILE).write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(CheckpointError, match="weight_map must be an object"):
        read_weight_map(str(ck))


# ---- bad inputs through `ringlinear train` ---------------------------------------------------------------
def _train_cli(tmp_path, capsys, fields: dict, *flags: str) -> str:
    """`ringlinear train --config FILE` in this process; the error message it ends with."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"model": "tiny", "steps": 1, "progress": False, "plot": False, **fields}))
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--config", str(cfg), *flags])
    msg = str(exc.value.code) if not isinstance(exc.value.code, int) else capsys.readouterr().err
    assert "Traceback" not in msg
    return msg


@pytest.mark.parametrize("fields, needle", [
    ({"lr": "abc"}, "lr='abc': must be a finite number"),
    ({"betas": 5}, "betas=5: must be a list"),
    ({"betas": [0.9, 1.5]}, "betas"),
    ({"data": "corpus.txt"}, "data='corpus.txt': must be a list of strings"),
    ({"seq_len": 100000}, "seq_len=100000: must be <= the model's max_position_embeddings=4096"),
    ({"model_overrides": {"num_experts": "x"}}, "num_experts"),
    ({"doc_separator": ""}, "doc_separator"),
    ({"parallelism": {"ep": "x"}, "aligned_numerics": "moe"}, "parallelism field ep='x': must be an integer"),
    ({"parallelism": {"ep": None}}, "parallelism field ep=None: must be an integer"),
])
def test_bad_fields_name_the_field(corpus, tmp_path, capsys, fields, needle):
    msg = _train_cli(tmp_path, capsys, {"data": [corpus], **fields})
    assert needle in msg, msg


def test_bad_flag_value_names_the_flag(corpus, tmp_path, capsys):
    msg = _train_cli(tmp_path, capsys, {"data": [corpus]}, "--lr", "abc")
    assert "--lr" in msg and "abc" in msg


def test_non_utf8_corpus_names_the_file_and_byte(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("utf-8") * 3 + "na\u00efve".encode("latin-1"))
    msg = _train_cli(tmp_path, capsys, {"data": [str(bad)]})
    assert str(bad) in msg and "not UTF-8" in msg and "byte 44 (line 4)" in msg, msg


def test_missing_corpus_names_the_file(tmp_path, capsys):
    msg = _train_cli(tmp_path, capsys, {"data": [str(tmp_path / "nope.txt")]})
    assert "nope.txt" in msg and "does not exist" in msg


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_safetensors_names_the_file(corpus, tmp_path, capsys, cut):
    from ringlinear.config import preset
    from ringlinear.pretrained import preset_with_tokenizer
    from ringlinear.tokenizer import tokenizer_files

    cfg, tok = preset_with_tokenizer("tiny", SMALL)
    ck = tmp_path / "ck"
    save_model(init_model(cfg, dtype="float32"), str(ck), extra_files=tokenizer_files(tok))
    shard = ck / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if cut == "data" else data[:6])
    assert preset("tiny").max_position_embeddings == 4096
    msg = _train_cli(tmp_path, capsys, {"data": [corpus], "model": str(ck)})
    assert str(shard) in msg and "not a readable safetensors file" in msg, msg


# ---- history.json ------------------------------------------------------------------------------------------
def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_history_json_is_strict_json(corpus, tmp_path):
    # 8 tokens x top-4 of 16 experts per micro-batch: some expert gets no token, so max/min load is infinite
    save = tmp_path / "run"
    tr = Trainer(_cfg(corpus, steps=3, seq_len=8, micro_batch=1, save_dir=str(save)))
    hist = tr.fit()
    assert any(h.get("moe/max_min_ratio") == float("inf") for h in hist)
    written = _strict((save / "history.json").read_text())
    assert [h["step"] for h in written] == [1, 2, 3]
    assert any(h["moe/max_min_ratio"] is None for h in written)
    assert all(h["loss"] == g["loss"] for h, g in zip(written, hist))


def test_deterministic_field_says_runs_without_it_are_not_reproducible():
    doc = field_docs(TrainConfig)["deterministic"]
    assert "NOT reproducible" in doc and "naive_moe_dispatch" in doc


# ---- chaos: kill -9 during saves, again and again -----------------------------------------------------------
RUNNER = """import sys, time
import ringlinear.files as files
from ringlinear.train.trainer import TrainConfig, Trainer
if sys.argv[2] == "slow":  # widen each save's window before its commit, so that a kill lands inside a save
    _sync = files.fsync_tree
    def slow_sync(path):
        print("SAVING", path, flush=True)
        time.sleep(0.3)
        _sync(path)
    files.fsync_tree = slow_sync
tr = Trainer(TrainConfig.from_json(sys.argv[1]))
print("RESUMED", tr.step, flush=True)
tr.fit()
"""


def _launch(tmp_path, cfg: dict, mode: str) -> subprocess.Popen:
    path = tmp_path / f"cfg-{cfg['save_dir'].rsplit('/', 1)[-1]}-{cfg['resume']}.json"
    path.write_text(json.dumps(cfg))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "always"}
    return subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(path), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_chaos_kill_during_saves_then_resume(corpus, tmp_path):
    """Four trainers killed with SIGKILL inside a save (each one resuming from what the last left), then a clean
    resume: it starts from the newest committed checkpoint, removes every leftover, and its losses are the
    uninterrupted run's, bit for bit."""
    cfg = dict(model="tiny", data=[corpus], seq_len=32, micro_batch=2, steps=10, lr=3e-3, warmup_steps=2,
               progress=False, plot=False, export=False, deterministic=True, model_overrides=SMALL, save_every=1,
               keep_checkpoints=2)
    ref = _launch(tmp_path, {**cfg, "save_dir": str(tmp_path / "ref"), "resume": False}, "fast")
    save = tmp_path / "run"
    rng = random.Random(0)
    leftovers_seen = 0
    for _ in range(4):
        p = _launch(tmp_path, {**cfg, "save_dir": str(save), "resume": True}, "slow")
        kill_at = rng.randint(1, 2)  # the save (of this process) inside which it dies
        seen = 0
        deadline = time.time() + 30
        for line in p.stdout:
            if line.startswith("SAVING"):
                seen += 1
                if seen == kill_at:
                    time.sleep(rng.uniform(0.0, 0.2))
                    p.send_signal(signal.SIGKILL)
                    break
            assert time.time() < deadline, "no save seen"
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL, p.stderr.read()[-3000:]
        p.stdout.close()
        p.stderr.close()
        leftovers_seen += len(_leftovers(save))
    assert leftovers_seen >= 4  # every kill landed inside a save and left its temp directory
    last = ckpt.list_checkpoints(str(save))[-1][0]
    final = _launch(tmp_path, {**cfg, "save_dir": str(save), "resume": True}, "fast")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err[-3000:]
    assert f"RESUMED {last}\n" in out, out
    assert "removed" in err and "interrupted" in err, err[-2000:]
    assert _leftovers(save) == []
    ref_out, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err[-3000:]
    want = [h["loss"] for h in json.loads((tmp_path / "ref" / "history.json").read_text())]
    got = [h["loss"] for h in json.loads((save / "history.json").read_text())]
    assert len(want) == 10 and got == want
