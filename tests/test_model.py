"""Model-level invariants of the hybrid decoder (CPU, fp32, tiny preset)."""

import math

import pytest
import torch

from ringlinear.config import preset
from ringlinear.layers.attention_context import DenseCache, PackedContext
from ringlinear.model import IGNORE_INDEX, init_model, shifted_within


@pytest.fixture(scope="module")
def model():
    m = init_model(preset("tiny"), seed=0, dtype="float32")
    return m.eval()


def test_prefill_equals_single_token_steps(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (29,))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(model.config, 1, "cpu")
        steps = torch.cat([model(ids[t : t + 1], cache.extend([0], [1])) for t in range(len(ids))])
        # states after T steps equal the states after one prefill
        pre = DenseCache(model.config, 1, "cpu")
        model(ids, pre.extend([0], [len(ids)]))
    assert (full - steps).abs().max() < 1e-4 * full.abs().max()
    for layer, st in cache.states.items():
        assert torch.allclose(st, pre.states[layer], rtol=1e-4, atol=1e-5)


def test_chunked_prefill_equals_one_prefill(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (40,))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(model.config, 1, "cpu")
        parts = [model(ids[a:b], cache.extend([0], [b - a])) for a, b in ((0, 13), (13, 14), (14, 40))]
    assert torch.allclose(torch.cat(parts), full, rtol=1e-4, atol=1e-4)


def test_ragged_batch_equals_each_alone(model):
    torch.manual_seed(2)
    seqs = [torch.randint(0, 320, (n,)) for n in (3, 17, 8)]
    with torch.no_grad():
        cache = DenseCache(model.config, 3, "cpu")
        batch_prefill = model(torch.cat(seqs), cache.extend([0, 1, 2], [len(s) for s in seqs]))
        nxt = torch.randint(0, 320, (3,))
        batch_step = model(nxt, cache.extend([0, 1, 2], [1, 1, 1]))
        off = 0
        for n, s in enumerate(seqs):
            alone = DenseCache(model.config, 1, "cpu")
            a = model(s, alone.extend([0], [len(s)]))
            b = model(nxt[n : n + 1], alone.extend([0], [1]))
            assert torch.allclose(batch_prefill[off : off + len(s)], a, rtol=1e-4, atol=1e-4)
            assert torch.allclose(batch_step[n], b[0], rtol=1e-4, atol=1e-4)
            off += len(s)


def test_packed_equals_separate(model):
    torch.manual_seed(3)
    a, b = torch.randint(0, 320, (9,)), torch.randint(0, 320, (14,))
    with torch.no_grad():
        packed = model(torch.cat([a, b]), PackedContext.from_lens([9, 14], "cpu"))
    assert torch.allclose(packed[:9], model(a), atol=1e-5) and torch.allclose(packed[9:], model(b), atol=1e-5)


def test_shifted_within_respects_boundaries():
    ids = torch.arange(10, 17)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert shifted_within(ids[:7], cu, 1).tolist() == [11, 12, IGNORE_INDEX, 14, 15, 16, IGNORE_INDEX]
    assert shifted_within(ids[:7], cu, 2).tolist() == [12, IGNORE_INDEX, IGNORE_INDEX, 15, 16, IGNORE_INDEX, IGNORE_INDEX]


def test_gradients_reach_every_parameter():
    m = init_model(preset("tiny"), seed=1, dtype="float32").train()
    torch.manual_seed(4)
    ids = torch.randint(0, 320, (160,))
    cu = torch.tensor([0, 50, 160], dtype=torch.int32)
    out = m.loss(ids, cu)
    assert set(out) == {"loss", "lm_loss", "mtp_loss"}
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the balancer's counters saw every routed token
    router = m.model.layers[1].mlp.gate
    assert router.tokens_per_expert.sum().item() == 160 * m.config.num_experts_per_tok


def test_mtp_loss_follows_the_loss_mask():
    """MTP depth k is trained on the labels shifted by k: with labels = next token it is the token k+1 ahead
    (the definition), and a masked target (IGNORE_INDEX) is masked for the MTP heads too."""
    import torch.nn.functional as F

    m = init_model(preset("tiny"), seed=1, dtype="float32").eval()
    assert m.config.num_nextn_predict_layers == 1
    torch.manual_seed(5)
    ids = torch.randint(0, 320, (40,))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    labels = shifted_within(ids, cu, 1)
    with torch.no_grad():
        full = m.loss(ids, cu)
        assert torch.equal(full["mtp_loss"], m.loss(ids, cu, labels=labels)["mtp_loss"])
        masked = labels.clone()
        masked[:10] = IGNORE_INDEX  # e.g. a prompt: no targets from its tokens
        got = m.loss(ids, cu, labels=masked)["mtp_loss"]
        # by hand: the MTP head's logits, cross entropy over the targets two ahead whose label is kept
        ctx = PackedContext.from_lens([17, 23], "cpu")
        h = m.model.mtp[0](m.model(ids, ctx), m.model.word_embeddings(shifted_within(ids, cu, 1).clamp(min=0)), ctx)
        logits = m.model.mtp[0].final_layernorm(h) @ m.lm_head_weight.T
        tgt = shifted_within(ids, cu, 2)
        keep = (tgt != IGNORE_INDEX) & (torch.arange(40) >= 9)  # the label at t+1 is masked for t < 9
        want = F.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(got, full["mtp_loss"])


def test_tied_embeddings_share_weight():
    m = init_model(preset("tiny", tie_word_embeddings=True), seed=0)
    assert m.lm_head is None and "lm_head.weight" not in m.state_dict()
    logits = m(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 320) and logits.dtype == torch.float32


def test_yarn_prefill_equals_single_token_steps():
    """A 4x YaRN model keeps the prefill == token-by-token decode invariant, and the scaling reaches the
    logits (both layer kinds rotate with the scaled frequencies and the attention factor)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    m = init_model(preset("tiny", rope_scaling=yarn, max_position_embeddings=4096), seed=0, dtype="float32").eval()
    plain = init_model(preset("tiny"), seed=0, dtype="float32").eval()
    for layer in m.model.layers:
        assert layer.attention.rotary.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    torch.manual_seed(6)
    ids = torch.randint(0, 320, (23,))
    with torch.no_grad():
        full = m(ids)
        cache = DenseCache(m.config, 1, "cpu")
        steps = torch.cat([m(ids[t : t + 1], cache.extend([0], [1])) for t in range(len(ids))])
        assert (full - plain(ids)).abs().max() > 1e-3 * full.abs().max()
    assert (full - steps).abs().max() < 1e-4 * full.abs().max()
