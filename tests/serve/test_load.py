"""The core of benchmarks/bench_server_load.py at a small size: `ringlinear serve` in a process of its own, 8
clients x 3 requests (completions and chat, streamed and not, greedy and seeded) beside clients sending faults
(streams closed mid-way, client timeouts, over-long prompts, bodies over the limit, a batch over the free
admissions, hostile numbers and strings): every good answer equals its request's alone, every fault gets its
answer, and afterwards /metrics shows nothing running, waiting or held and the choices finished as the clients
saw them."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_server_load import run_load  # noqa: E402


def test_load_with_faults_loses_nothing(ckpt):
    res = run_load(ckpt, clients=8, requests=3, unique=12, fault_workers=2, max_waiting=16, budget_s=60,
                   verbose=False)
    s = res.summary()
    assert s["sent"] == 24 and s["not_sent"] == 0
    assert s["good_equal_alone"] == 24 and s["wrong"] == 0 and s["failed"] == 0, s["problems"]
    assert all(f["answers"] for f in s["faults"].values())  # every kind sent (after the load if it was short)
    assert s["faults_unexpected"] == 0, s["problems"]
    assert {k: s["leaks"][k] for k in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used",
                                       "state_slots_used")} == dict.fromkeys(
        ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "state_slots_used"), 0)
    assert s["finished_on_server"] == s["finished_expected"] and s["leaks"]["server_healthy_after"]
    assert res.ok
