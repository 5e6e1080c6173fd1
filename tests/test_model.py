"""Model-level invariants of the hybrid decoder (CPU, fp32, tiny preset)."""

import pytest
import torch

from ringlinear.checkpoint import init_model
from ringlinear.config import preset
from ringlinear.layers.attention_context import DenseCache, PackedContext
from ringlinear.model import IGNORE_INDEX, shifted_within


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


def test_tied_embeddings_share_weight():
    m = init_model(preset("tiny", tie_word_embeddings=True), seed=0)
    assert m.lm_head is None and "lm_head.weight" not in m.state_dict()
    logits = m(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 320) and logits.dtype == torch.float32
