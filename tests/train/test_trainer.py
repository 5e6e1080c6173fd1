"""Trainer on the CPU: loss falls, resume is bit-for-bit, corrupt/mismatched checkpoints are refused,
export loads in the engine's loader, data packing keeps boundaries, bias balancing moves the right way."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from ringlinear.config import preset
from ringlinear.hf import load_model
from ringlinear.layers.moe import Router
from ringlinear.train.balancing import update_expert_bias
from ringlinear.train.data import PackedDataset, pack_rows
from ringlinear.train.optim import lr_lambda
from ringlinear.train.state import TrainCheckpointError, list_checkpoints
from ringlinear.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = [f"the quick brown fox {i % 7} jumps over the lazy dog. " * (1 + i % 3) for i in range(120)]
    path = d / "corpus.txt"
    path.write_text("\n\n\n".join(docs))
    return str(path)


def _cfg(corpus, **kw):
    base = dict(model="tiny", data=[corpus], seq_len=48, micro_batch=2, steps=6, lr=3e-3, warmup_steps=2,
                progress=False, plot=False, model_overrides={"num_hidden_layers": 3})
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_loss_decreases(corpus):
    hist = Trainer(_cfg(corpus, steps=30, model_overrides={})).fit()
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert last < 0.5 * first, (first, last)
    assert "mtp_loss" in hist[0] and hist[0]["mtp_loss"] > 0


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_is_bit_for_bit(corpus, tmp_path, deterministic):
    full = Trainer(_cfg(corpus, steps=6, grad_accum=2, save_dir=str(tmp_path / "a"), export=False, deterministic=True))
    h_full = full.fit()
    # "crash" after 3 steps (a checkpoint every 3), then a fresh process-equivalent resumes to 6.
    part = Trainer(_cfg(corpus, steps=6, grad_accum=2, save_dir=str(tmp_path / "b"), save_every=3, export=False,
                        deterministic=True))
    part.fit(stop_after=4)  # dies during step 4's aftermath: the step-3 checkpoint is the latest
    resumed = Trainer(_cfg(corpus, steps=6, grad_accum=2, save_dir=str(tmp_path / "b"), resume=True, export=False,
                           deterministic=True))
    assert resumed.step == 3 and part.step == 4
    h_res = resumed.fit()
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(k.endswith("expert_bias") and sa[k].abs().sum() > 0 for k in sa)  # biases did move (and match)


def test_corrupt_and_mismatched_checkpoint_refused(corpus, tmp_path):
    save = str(tmp_path / "run")
    Trainer(_cfg(corpus, steps=2, save_dir=save, export=False)).fit()
    (_, path), = list_checkpoints(save)
    with pytest.raises(TrainCheckpointError, match="different training setup"):
        Trainer(_cfg(corpus, steps=4, save_dir=save, resume=True, micro_batch=3))
    with pytest.raises(TrainCheckpointError, match="different training setup"):
        Trainer(_cfg(corpus, steps=4, save_dir=save, resume=True, model_overrides={"num_hidden_layers": 4}))
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    with pytest.raises(TrainCheckpointError, match="corrupt"):
        Trainer(_cfg(corpus, steps=4, save_dir=save, resume=True))
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(TrainCheckpointError, match="manifest"):
        Trainer(_cfg(corpus, steps=4, save_dir=save, resume=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test: feeds CPU tensors to the trainer's model (on a GPU machine: CUDA, bf16)")
def test_export_loads_in_hf_layout(corpus, tmp_path):
    save = str(tmp_path / "run")
    tr = Trainer(_cfg(corpus, steps=2, save_dir=save, export_dtype="float32", plot=True))
    tr.fit()
    final = os.path.join(save, "final")
    assert os.path.exists(os.path.join(final, "tokenizer.json")) and os.path.exists(os.path.join(save, "loss.png"))
    m = load_model(final, dtype="float32")
    ids = torch.randint(0, 256, (20,))
    tr.model.eval()
    m.eval()
    torch.testing.assert_close(m(ids), tr.model(ids), rtol=0, atol=0)
    assert len(json.load(open(os.path.join(save, "history.json")))) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test: feeds CPU tensors to the trainer's model (on a GPU machine: CUDA, bf16)")
def test_activation_checkpointing_same_grads(corpus):
    a = Trainer(_cfg(corpus, steps=2))
    b = Trainer(_cfg(corpus, steps=2, activation_checkpointing=True))
    ids, cu = a.data.next_rows(2)
    la, lb = a.model.loss(ids, cu)["loss"], b.model.loss(ids, cu)["loss"]
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_pack_rows_respects_boundaries():
    docs = [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 10, 11, 9], [12, 9]]
    tokens, segs = pack_rows(docs, 5)
    assert tokens.tolist() == [[1, 2, 3, 9, 4], [5, 9, 6, 7, 8], [10, 11, 9, 12, 9]]
    assert segs == [[4, 1], [2, 3], [3, 2]]
    ds = PackedDataset(tokens, segs, shuffle=False)
    ids, cu = ds.next_rows(2)
    assert ids.tolist() == [1, 2, 3, 9, 4, 5, 9, 6, 7, 8] and cu.tolist() == [0, 4, 5, 7, 10]
    # resumable position, and a new permutation per epoch
    ds2 = PackedDataset(tokens, segs, seed=3)
    seen = ds2.next_row_ids(4)
    state = ds2.state_dict()
    nxt = ds2.next_row_ids(5)
    ds3 = PackedDataset(tokens, segs, seed=3)
    ds3.load_state_dict(state)
    assert ds3.next_row_ids(5) == nxt and sorted(seen[:3]) == [0, 1, 2]
    with pytest.raises(ValueError, match="different data"):
        PackedDataset(tokens, segs, seed=4).load_state_dict(state)


def test_pack_rows_segments_match_a_per_token_walk():
    """Random documents (lengths 1..40, some longer than a row): each row's pieces are the runs of one document,
    found by walking the tokens one by one."""
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(100)] * rng.randint(1, 40) for _ in range(300)]
    for seq_len in (7, 16, 64):
        _, segs = pack_rows(docs, seq_len)
        owner = [i for i, d in enumerate(docs) for _ in d]
        for r, row in enumerate(segs):
            own = owner[r * seq_len : (r + 1) * seq_len]
            runs = [len(list(g)) for _, g in itertools.groupby(own)]
            assert row == runs, (seq_len, r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test: feeds CPU tensors to the trainer's model (on a GPU machine: CUDA, bf16)")
def test_loss_mask_packs_with_documents_and_reaches_the_loss(corpus):
    docs = [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 10, 11, 9], [12, 9]]
    masks = [[True] * 4, [False, True, False], [False] * 6, [True, True]]
    tokens, segs, mask = pack_rows(docs, 5, masks)
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    ds = PackedDataset(tokens, segs, shuffle=False, loss_mask=mask)
    ids, cu = ds.batch([0, 1])
    # targets: next token within the document, ignored where masked and at each document's last token
    assert ds.labels([0, 1], cu).tolist() == [2, 3, 9, -100, -100, 9, -100, -100, -100, -100]
    assert PackedDataset(tokens, segs).labels([0], cu) is None
    with pytest.raises(ValueError, match="one bool per token"):
        pack_rows(docs, 5, masks[:3])
    with pytest.raises(ValueError, match="must match tokens"):
        PackedDataset(tokens, segs, loss_mask=mask[:2])
    # the trainer's loss counts only the unmasked targets: masking all but the first token of each row
    # changes the loss to the mean over those targets alone
    tr = Trainer(_cfg(corpus))
    rows = list(range(2))
    ids, cu = tr.data.batch(rows)
    full = tr.model.loss(ids, cu)["lm_loss"].item()
    m = torch.zeros_like(tr.data.tokens, dtype=torch.bool)
    m[:, 0] = True
    tr.data.loss_mask = m
    only_first = tr.model.loss(ids, cu, labels=tr.data.labels(rows, cu))["lm_loss"].item()
    logits = tr.model(ids.view(2, -1))[:, 0].float()
    want = torch.nn.functional.cross_entropy(logits, ids.view(2, -1)[:, 1]).item()
    assert abs(only_first - want) < 1e-4 and abs(full - want) > 1e-3


def test_bias_balancing_moves_toward_balance():
    cfg = preset("tiny")
    r = Router(cfg)
    r.weight.data.normal_()
    r.tokens_per_expert.zero_()
    load = torch.arange(16, dtype=torch.float32)  # expert 0 idle ... expert 15 busiest; mean 7.5
    r.tokens_per_expert += load
    model = torch.nn.Sequential(r)
    stats = update_expert_bias(model, rate=0.01)
    assert torch.equal(r.expert_bias, torch.where(load < 7.5, 0.01, -0.01))
    assert r.tokens_per_expert.sum() == 0
    assert stats["moe/max_min_ratio"] == float("inf") and stats["moe/cv"] == pytest.approx(load.std(unbiased=False).item() / 7.5)
    # repeated updates from a skewed router actually even the load out
    r.expert_bias.zero_()
    r.train()
    x = torch.randn(512, cfg.hidden_size) + 0.5
    r.weight.data[0] += 0.3  # expert 0 favoured by every token
    cv = []
    for _ in range(60):
        r(x)
        cv.append(update_expert_bias(model, rate=0.02)["moe/cv"])
    assert cv[-1] < 0.6 * cv[0], (cv[0], cv[-1])


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_lambda(55, 10, 100, 0.1) < 1.0


def test_bad_config_rejected(corpus):
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"model": "tiny", "data": [corpus], "stepz": 3})
    with pytest.raises(ValueError, match="data"):
        TrainConfig.from_dict({"model": "tiny"})


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_and_step_fused_matches_clip_then_step(max_norm):
    """The fused AdamW clips through its grad_scale (no separate pass over the gradients): same parameters as
    clip_grad_norm_ followed by the step, same norm reported, the optimizer left without a grad_scale."""
    from ringlinear.train.optim import clip_and_step

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    grads = [torch.randn(s, generator=g) * 3 for s in shapes]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(1))) for s in shapes]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, **({"fused": True} if fused else {}))
        for scale in (1.0, 0.01):  # one step clipped, the next not: clipping changes Adam's moments' ratio
            for p, gr in zip(params, grads):
                p.grad = gr * scale
            norm = clip_and_step(opt, params, max_norm)
        assert getattr(opt, "grad_scale", None) is None
        runs.append((norm, [p.detach().clone() for p in params]))
    (n_f, p_f), (n_r, p_r) = runs
    torch.testing.assert_close(n_f, n_r)
    torch.testing.assert_close(n_f, 0.01 * torch.linalg.vector_norm(torch.cat([x.flatten() for x in grads])))
    for a, b in zip(p_f, p_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_params_step_through_fp32_masters(corpus):
    """compute_dtype bf16: every bf16 parameter has its own fp32 master (the optimizer never steps bf16 weights),
    the routers stay fp32 (their own masters), and after a step each bf16 weight is its master rounded; the FP8
    recipe's cached weight quantizations are dropped after every step."""
    from ringlinear.train.fp8_recipe import invalidate_fp8_weights

    tr = Trainer(_cfg(corpus, steps=2, compute_dtype="bf16"))
    low = [(p, m) for p, m in tr.master.pairs if p.dtype == torch.bfloat16]
    assert low and all(m is not p and m.dtype == torch.float32 for p, m in low)
    assert all(m is p for p, m in tr.master.pairs if p.dtype == torch.float32)
    opt_params = {id(q) for g in tr.optimizer.param_groups for q in g["params"]}
    assert all(id(m) in opt_params and id(p) not in opt_params for p, m in low)
    before = [m.detach().clone() for _, m in low]
    mod = next(iter(tr.model.modules()))
    mod.__dict__["_fp8_cache"] = {"w": ("key", "val")}
    tr.train_step()
    assert not mod.__dict__["_fp8_cache"]
    assert any(not torch.equal(b, m) for b, (_, m) in zip(before, low))
    for p, m in low:
        assert torch.equal(p, m.to(torch.bfloat16))
    invalidate_fp8_weights(tr.model)  # no caches left: a no-op


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test: feeds CPU tensors to the trainer's model (on a GPU machine: CUDA, bf16)")
def test_step_loss_is_the_mean_over_all_targets_of_its_micro_batches(corpus):
    """Under a loss mask the micro-batches of a step hold different numbers of targets: the step trains on the mean
    over all of them (not the mean of the micro-batches' means), and a micro-batch with none adds nothing (its own
    mean is NaN: before, the step's loss and gradients were NaN)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 200, (4, 48), generator=g)
    segs = [[48] for _ in range(4)]
    mask = torch.zeros(4, 48, dtype=torch.bool)
    mask[1, 5:30] = True  # step 1: row 0 has no targets, row 1 has 25
    mask[2, 10:12] = True  # step 2: row 2 has 2 targets, row 3 has 40
    mask[3, 0:40] = True
    ds = PackedDataset(tokens, segs, shuffle=False, loss_mask=mask)
    tr = Trainer(_cfg(corpus, micro_batch=1, grad_accum=2, steps=2, model_overrides={"num_hidden_layers": 2}),
                 dataset=ds)

    def losses(rows):
        with torch.no_grad():
            out = []
            for r in rows:
                ids, cu = ds.batch([r])
                out.append(tr.model.loss(ids, cu, labels=ds.labels([r], cu)))
            return out

    _, b = losses([0, 1])
    rec = tr.train_step()
    assert rec["targets"] == 25 and abs(rec["loss"] - b["loss"].item()) < 1e-5 * abs(rec["loss"])
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    c, d = losses([2, 3])
    rec = tr.train_step()
    want = (2 * c["lm_loss"] + 40 * d["lm_loss"]).item() / 42
    assert rec["targets"] == 42 and abs(rec["lm_loss"] - want) < 1e-5 * want
    assert abs(rec["lm_loss"] - (c["lm_loss"] + d["lm_loss"]).item() / 2) > 1e-3  # not the mean of the means


def test_init_device_draws_on_the_trainers_device(corpus):
    """init_device "device": the preset's weights drawn where the trainer runs (here the CPU: the very weights of
    "cpu"); anything else is refused."""
    with pytest.raises(ValueError, match="init_device"):
        _cfg(corpus, init_device="gpu").validate()
    a, b = (Trainer(_cfg(corpus, init_device=d, save_dir=None)) for d in ("cpu", "device"))
    try:
        for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
            assert torch.equal(p, q), n
    finally:
        a.close()
        b.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_on_the_gpu_is_seeded():
    """init_model on a GPU: the same seed gives the same weights, another seed others; std as configured."""
    from ringlinear.model import init_model

    c = preset("tiny")
    a, b, d = (init_model(c, seed=s, device="cuda", dtype="float32") for s in (3, 3, 4))
    w = "model.layers.1.mlp.gate_proj"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], d.state_dict()[w])
    assert abs(a.state_dict()[w].std().item() - c.initializer_range) < 0.1 * c.initializer_range


def test_aligned_numerics_trains_like_the_default(corpus, monkeypatch):
    """The RL alignment switches in the trainer: the same losses up to fp32 rounding (the values of the aligned
    forward, the gradients of the ordinary one), and the switch reaches the forward (the recurrent form runs)."""
    import ringlinear.ops.batch_invariant as bi

    calls = []
    real = bi.packed_recurrent_lightning
    monkeypatch.setattr("ringlinear.layers.attention_context.packed_recurrent_lightning",
                        lambda *a: calls.append(1) or real(*a))
    a = Trainer(_cfg(corpus, steps=3)).fit()
    assert not calls
    b = Trainer(_cfg(corpus, steps=3, aligned_numerics="all")).fit()
    assert calls
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4 * abs(x["loss"])
    with pytest.raises(ValueError, match="aligned_numerics"):
        _cfg(corpus, aligned_numerics="fast")
