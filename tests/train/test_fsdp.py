"""FSDP2 data parallelism on the CPU (gloo, 2 processes through torchrun): the loss curve equals one process with
the same global batch (2 ranks x 1 micro-batch == 1 rank x 2 accumulated), a sharded checkpoint resumes on 2
ranks onto the same curve, and the exported model matches the single-process one."""

import os

import pytest
import torch
from _fsdp_launch import pydoc_corpus, run_trainer

from ringlinear.hf import load_model


def _train(tmp_path, name, nproc, steps, accum, resume=False, save_every=0, stop_after=0):
    """Run the trainer in `nproc` fresh processes (torchrun, gloo); `stop_after` kills it after that step."""
    cfg = {"model": "tiny", "data": [pydoc_corpus(tmp_path / "corpus.txt", 40)], "seq_len": 64, "micro_batch": 2,
           "grad_accum": accum, "steps": steps, "lr": 1e-3, "warmup_steps": 2, "save_every": save_every,
           "progress": False, "deterministic": True, "resume": resume, "export_dtype": "float32"}
    return run_trainer(tmp_path, name, nproc, cfg, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                       stop_after=stop_after)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_rank_fsdp_matches_one_rank_and_resumes(tmp_path):
    one = _train(tmp_path, "one", 1, 6, accum=2)
    _train(tmp_path, "two", 2, 6, accum=1, save_every=2, stop_after=5)  # "crash" after step 5: step-4 is the latest
    assert sorted(n for n in os.listdir(tmp_path / "two") if n != ".lock") == ["step-00000002", "step-00000004"]
    resumed = _train(tmp_path, "two", 2, 6, accum=1, resume=True, save_every=2)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    curve_one, curve_two = [h["loss"] for h in one], [h["loss"] for h in resumed]
    for a, b in zip(curve_one, curve_two):  # same data, same init; only the reduction order differs
        assert abs(a - b) <= 1e-5 * abs(a), (curve_one, curve_two)
    assert curve_one[-1] < curve_one[0]
    m1, m2 = load_model(str(tmp_path / "one" / "final")), load_model(str(tmp_path / "two" / "final"))
    ids = torch.arange(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids), m1(ids), rtol=1e-4, atol=1e-4)
