"""Tensor + expert parallel model on the CPU (gloo, spawned processes): the split model's fp32 logits equal the
unsplit model's within 1e-5 relative (both layer kinds, dense MLP, experts, shared expert; KV heads replicated when
ranks outnumber them), each rank reads only its slices of the checkpoint, and a split that does not divide the
model is refused naming the field."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringlinear.config import ConfigError, preset
from ringlinear.distributed.tensor_parallel import ShardGroup, check_tensor_parallel, local_config
from ringlinear.hf import save_model
from ringlinear.loading.sharded import CheckpointReader, load_for_inference, sources_of
from ringlinear.model import build_model, init_model

PROMPT = list(range(3, 60)) + [5, 9, 250, 7]


def _tiny(n: int):
    # group_norm_size must be divisible by the ranks: tiny has 2 groups of 2 heads; 4 ranks need 4 groups of 1
    return preset("tiny", group_norm_size=4) if n == 4 else preset("tiny")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for n in (2, 4):
        d = tmp_path_factory.mktemp(f"tiny{n}")
        save_model(init_model(_tiny(n), seed=2), str(d))
        out[n] = str(d)
    return out


def _rank_logits(rank: int, n: int, path: str, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, n, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n)
    try:
        model = load_for_inference(path, torch.device("cpu"), torch.float32, ShardGroup(rank, n))
        with torch.no_grad():
            logits = model(torch.tensor(PROMPT))
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 4])
def test_split_logits_equal_unsplit(checkpoints, tmp_path, n):
    path = checkpoints[n]
    whole = load_for_inference(path, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ref = whole(torch.tensor(PROMPT))
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    port = store.port
    del store  # a free port for the ranks' own store
    mp.start_processes(_rank_logits, args=(n, path, port, str(tmp_path / "logits.pt")), nprocs=n, start_method="spawn")
    # the launcher passes the index first: mp calls fn(i, *args)
    got = torch.load(tmp_path / "logits.pt")
    assert got.shape == ref.shape == (len(PROMPT), _tiny(n).vocab_size)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


class CountingReader(CheckpointReader):
    def __init__(self, path):
        super().__init__(path)
        self.bytes = 0

    def read(self, name, dim, start, stop):
        t = super().read(name, dim, start, stop)
        self.bytes += t.numel() * t.element_size()
        return t


def test_each_rank_reads_its_slices(checkpoints):
    path = checkpoints[2]
    full = CountingReader(path)
    load_for_inference(path, torch.device("cpu"), torch.float32, reader=full)
    reads, models = [], []
    for rank in range(2):
        reader = CountingReader(path)
        models.append(load_for_inference(path, torch.device("cpu"), torch.float32, ShardGroup(rank, 2),
                                         reader=reader))
        reads.append(reader.bytes)
    cfg = preset("tiny")
    router = sum(t.numel() * 4 for n, t in models[0].state_dict().items() if ".mlp.gate." in n or "norm" in n)
    for r in reads:  # half the sharded weights each, plus what every rank holds whole (router, norms)
        assert r <= full.bytes / 2 + router, (r, full.bytes)
    # the two ranks' slices put back together are the checkpoint's tensors
    ref = init_model(cfg, seed=2).state_dict()
    a, b = (m.state_dict() for m in models)
    torch.testing.assert_close(torch.cat([a["model.word_embeddings.weight"], b["model.word_embeddings.weight"]]),
                               ref["model.word_embeddings.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([a["model.layers.1.mlp.gate_proj"], b["model.layers.1.mlp.gate_proj"]]),
                               ref["model.layers.1.mlp.gate_proj"], rtol=0, atol=0)
    dense = "model.layers.2.attention.dense.weight"
    torch.testing.assert_close(torch.cat([a[dense], b[dense]], 1), ref[dense], rtol=0, atol=0)
    qkv = "model.layers.2.attention.query_key_value.weight"  # softmax layer: q, k, v heads of each rank
    D, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = ref[qkv].split([H * D, Hkv * D, Hkv * D])
    torch.testing.assert_close(a[qkv], torch.cat([q[: H * D // 2], k[:D], v[:D]]), rtol=0, atol=0)
    torch.testing.assert_close(b[qkv], torch.cat([q[H * D // 2 :], k[D:], v[D:]]), rtol=0, atol=0)


def test_meta_slices_and_sources():
    cfg = preset("ring-flash-linear-2.0")
    model = build_model(cfg, "meta")
    from ringlinear.distributed.tensor_parallel import shard_model

    shard_model(model, ShardGroup(1, 8))
    loc = local_config(cfg, 8)
    assert (loc.num_attention_heads, loc.num_key_value_heads, loc.group_norm_size) == (4, 1, 1)
    att = model.model.layers[7].attention  # softmax: 4 query heads and the one KV head they read (replicated)
    assert att.query_key_value.weight.shape == ((4 + 2) * 128, 4096)
    src = sources_of(model)["model.layers.7.attention.query_key_value.weight"]
    assert [(p.start, p.stop) for p in src.pieces] == [(512, 1024), (4096, 4224), (4608, 4736)]
    assert model.model.layers[3].mlp.gate_proj.shape == (32, 1024, 4096)  # 256 experts / 8
    assert model.model.layers[3].mlp.expert_offset == 32
    assert model.model.layers[3].attention.decay.shape == (4,)
    assert "model.layers.3.mlp.gate.weight" not in model.checkpoint_sources  # the router: whole on every rank


@pytest.mark.parametrize("overrides,n,field", [
    ({}, 3, "num_attention_heads"),
    ({}, 4, "group_norm_size"),
    ({"num_experts": 6, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "group_norm_size": 4}, 4,
     "num_experts"),
    ({"num_key_value_heads": 4, "num_attention_heads": 12, "group_norm_size": 6}, 3, "num_key_value_heads"),
])
def test_splits_that_do_not_divide_are_refused(overrides, n, field):
    cfg = preset("tiny", **overrides)
    with pytest.raises(ConfigError, match=f"tensor_parallel_size={n}: {field}"):
        check_tensor_parallel(cfg, n)


def test_group_norm_error_says_what_happens():
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(preset("ring-mini-linear-2.0"), 8)
    assert "group_norm_size=4" in str(e.value) and "all-reduce" in str(e.value)
    check_tensor_parallel(preset("ring-mini-linear-2.0"), 4)
    check_tensor_parallel(preset("ring-flash-linear-2.0"), 8)


def test_parallelize_refuses_a_built_model():
    from ringlinear.distributed.tensor_parallel import parallelize_for_inference

    with pytest.raises(ValueError, match="meta"):
        parallelize_for_inference(init_model(preset("tiny")), ShardGroup(0, 2))


def test_dummy_weights_agree_where_ranks_hold_the_same_tensor():
    """load_format dummy (benchmarks): random weights made in place, the same on every rank where each holds the
    whole tensor (routers, norms), FP8 slots quantized from them."""
    a, b = (load_for_inference("tiny", torch.device("cpu"), torch.float32, ShardGroup(r, 2), "fp8", dummy=True)
            for r in range(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["model.layers.1.mlp.gate.weight"], sb["model.layers.1.mlp.gate.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones(128))
    assert sa["model.layers.1.mlp.gate_proj"].dtype == torch.float8_e4m3fn
    assert (sa["model.layers.1.mlp.gate_proj_scale_inv"] > 0).all()
    assert 0.01 < sa["model.word_embeddings.weight"].std() < 0.03


def test_dummy_weights_of_two_ranks_are_slices_of_one_ranks():
    """load_format dummy makes each HF tensor whole from its name and cuts it: TP=2's experts and columns are TP=1's
    (so TP=1 and TP=2 engines on dummy weights run the same model and their greedy tokens can be compared)."""
    one = load_for_inference("tiny", torch.device("cpu"), torch.float32, dummy=True).state_dict()
    two = [load_for_inference("tiny", torch.device("cpu"), torch.float32, ShardGroup(r, 2), dummy=True).state_dict()
           for r in range(2)]
    name = "model.layers.1.mlp.gate_proj"  # stacked experts: rank r holds experts [r E/2, (r + 1) E/2)
    assert torch.equal(torch.cat([two[0][name], two[1][name]]), one[name])
    rows = one["model.word_embeddings.weight"]  # vocabulary rows, the last shard zero-padded
    cat = torch.cat([two[0]["model.word_embeddings.weight"], two[1]["model.word_embeddings.weight"]])
    assert torch.equal(cat[: rows.shape[0]], rows)
    assert not torch.equal(two[0][name], two[1][name])
