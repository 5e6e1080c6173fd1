"""Checkpoints we save load in transformers (`trust_remote_code`) through ringlinear/hf_remote and compute our forward;
a checkpoint that brings its own remote code keeps it."""

import ast
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import safetensors
import torch

from ringlinear.config import RingLinearConfig, preset
from ringlinear.hf import load_model, save_model
from ringlinear.hf_remote import AUTO_MAP, FILES
from ringlinear.layers.attention_context import DenseCache
from ringlinear.model import build_model, init_model

transformers = pytest.importorskip("transformers")

VARIANT = dict(  # every switch the remote code reads, away from the tiny preset's values
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    max_position_embeddings=4096, tie_word_embeddings=True, linear_silu=True, lightning_layerwise_decay=False,
    num_experts_per_tok=1, moe_shared_expert_intermediate_size=None, num_shared_experts=2,
    num_hidden_layers=7, use_qkv_bias=True, use_bias=True, first_k_dense_replace=2,
)


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE; keep it out of the home directory."""
    import transformers.dynamic_module_utils as dmu

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


def _model(cfg: RingLinearConfig, dtype: str = "float32"):
    m = init_model(cfg, seed=0, dtype=dtype).eval()
    with torch.no_grad():  # a non-zero selection bias and biases, so that loading them matters
        for name, t in m.state_dict().items():
            if name.endswith("expert_bias") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape) * 0.05)
    return m


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype, output_loading_info=True)


def _greedy(m, prompt: torch.Tensor, n: int) -> list[int]:
    cache = DenseCache(m.config, 1, "cpu")
    toks = prompt.tolist()
    with torch.no_grad():
        logits = m(prompt, cache.extend([0], [len(toks)]))
        for _ in range(n):
            toks.append(int(logits[-1].argmax()))
            logits = m(torch.tensor(toks[-1:]), cache.extend([0], [1]))
    return toks


@pytest.mark.parametrize("overrides", [{}, VARIANT], ids=["tiny", "variant"])
def test_transformers_loads_checkpoint_and_logits_equal(tmp_path, overrides):
    """tiny: experts with shared expert and selection bias, both layer kinds, a dense first layer, one MTP module in the
    file (unused by the HF forward); variant: YaRN, tied embeddings, SiLU on qkv, no depth decay, top-1 routing
    (renormalised), biases. fp32 logits of transformers' model equal ours."""
    m = _model(preset("tiny", **overrides))
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP and all((tmp_path / "ck" / f).is_file() for f in FILES)
    with safetensors.safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert any(k.startswith("model.mtp.0.") for k in f.keys())
    hf, info = _hf(tmp_path / "ck")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == "BailingMoeLinearV2ForCausalLM"
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (2, 37))
    with torch.no_grad():
        ours = m(ids)
        theirs = hf(input_ids=ids).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-5


def test_generate_with_cache_equals_our_greedy_decoding(tmp_path):
    """generate: one prefill then one token per forward through the remote code's cache; greedy tokens equal ours,
    also for a left-padded batch (padding neither enters a linear state nor is attended to); beam search too."""
    m = _model(preset("tiny"))
    save_model(m, tmp_path / "ck")
    hf, _ = _hf(tmp_path / "ck")
    torch.manual_seed(2)
    a, b = torch.randint(0, 256, (5,)), torch.randint(0, 256, (9,))
    lens = []
    hook = hf.register_forward_pre_hook(lambda mod, args, kw: lens.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
    out = hf.generate(a[None], max_new_tokens=6, do_sample=False)
    hook.remove()
    assert lens == [5] + [1] * 5
    assert out[0].tolist() == _greedy(m, a, 6)
    batch = torch.full((2, 9), 256)
    batch[0, 4:], batch[1] = a, b
    mask = (batch != 256).long()
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert out[0, 4:].tolist() == _greedy(m, a, 4) and out[1].tolist() == _greedy(m, b, 4)
    # beam search reorders the cache between steps: same beams as recomputing everything each step
    beams = [hf.generate(b[None], max_new_tokens=4, num_beams=3, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(*beams)


def test_padding_anywhere_leaves_the_cache_as_without_it(tmp_path):
    """Right and middle padding (attention_mask 0) neither decays nor feeds a linear state nor is attended to: the
    next step from the cache equals ours on the sequence without the padding."""
    m = _model(preset("tiny"))
    save_model(m, tmp_path / "ck")
    hf, _ = _hf(tmp_path / "ck")
    torch.manual_seed(3)
    seq = torch.randint(0, 256, (8,))
    nxt = torch.randint(0, 256, (1,))
    ids = torch.cat([seq[:3], torch.tensor([256, 256]), seq[3:], torch.tensor([256, 256])])[None]
    mask = (ids != 256).long()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, use_cache=True)
        name = "cache" if hasattr(out, "cache") else "past_key_values"  # transformers >= 5 / older
        step = hf(input_ids=nxt[None], attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1),
                  use_cache=True, **{name: getattr(out, name)}).logits[0]
        ours = m(torch.cat([seq, nxt]))
    torch.testing.assert_close(out.logits[0][mask[0].bool()], ours[:8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0], ours[8], rtol=1e-5, atol=1e-5)


def test_remote_code_pieces_equal_ours():
    """Routing, RoPE frequencies, per-layer decay and the masked chunked recurrence of the remote code against
    ringlinear's own functions and its token-by-token reference."""
    from ringlinear.hf_remote import modeling_bailing_moe_linear as hfm
    from ringlinear.layers.rotary import rope_frequencies
    from ringlinear.ops.lightning import decay_slopes
    from ringlinear.ops.lightning import naive_recurrent_lightning_attn as lightning_attn_recurrent
    from ringlinear.ops.moe import grouped_topk

    torch.manual_seed(4)
    logits, bias = torch.randn(40, 16), torch.randn(16) * 0.2
    for k, norm, n_group, b in [(1, True, 4, bias), (1, False, 1, None), (3, False, 4, bias), (4, True, 2, None)]:
        for got, want in zip(hfm.grouped_topk(logits, b, k, n_group, 2 if n_group > 1 else 1, norm, 2.5),
                             grouped_topk(logits, b, k, n_group, 2 if n_group > 1 else 1, norm, 2.5)):
            assert torch.equal(got, want), (k, norm, n_group)
    for scaling in [None, {"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0},
                    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 8,
                     "mscale": 0.8, "mscale_all_dim": 0.6, "truncate": False}]:
        inv, factor = hfm.rope_frequencies(24, 5e5, scaling, 8192)
        want, want_factor = rope_frequencies(24, 5e5, scaling, 8192)
        assert torch.equal(torch.tensor(inv, dtype=torch.float32), want) and factor == want_factor
    for H, i, L, lw in [(16, 0, 20, True), (16, 7, 20, True), (6, 3, 8, True), (4, 2, 5, False), (4, 0, 1, True)]:
        assert torch.equal(torch.tensor(hfm.linear_layer_decay(H, i, L, lw), dtype=torch.float32),
                           decay_slopes(H, i, L, lw))
    B, H, T, D = 2, 3, 70, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(H, dtype=torch.float64)
    s0 = torch.randn(B, H, D, D, dtype=torch.float64)
    valid = torch.rand(B, T) > 0.3
    o, state = hfm.lightning_attention(q, k, v, g, valid, s0.clone(), 0.3, chunk_size=16)
    for b in range(B):
        keep = valid[b]
        ref, ref_state = lightning_attn_recurrent(*(t[b : b + 1, :, keep].transpose(1, 2) for t in (q, k, v)), g, 0.3,
                                                  s0[b : b + 1], output_final_state=True)
        torch.testing.assert_close(o[b, :, keep], ref[0].transpose(0, 1))
        torch.testing.assert_close(state[b], ref_state[0])


def test_bf16_checkpoint_keeps_the_router_fp32(tmp_path):
    m = _model(preset("tiny"), dtype="bfloat16")
    save_model(m, tmp_path / "ck")
    hf, _ = _hf(tmp_path / "ck", torch.bfloat16)
    gate = hf.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.expert_bias.dtype == torch.float32
    assert hf.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        ours, theirs = m(ids), hf(input_ids=ids).logits
    assert ((theirs - ours).norm() / ours.norm()).item() <= 2e-2


def test_remote_code_is_self_contained_and_defaults_agree():
    """The two files import the standard library, torch and transformers only (never ringlinear), and the HF config's defaults are ours."""
    from ringlinear.hf_remote.configuration_bailing_moe_linear import BailingMoeLinearV2Config

    here = Path(__file__).parents[1] / "ringlinear" / "hf_remote"
    for name in FILES:
        tree = ast.parse((here / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers"}, (name, roots)
    hf, ours = BailingMoeLinearV2Config(), RingLinearConfig()
    for f in dataclasses.fields(RingLinearConfig):
        if f.name not in ("extra", "torch_dtype", "rope_scaling"):
            assert getattr(hf, f.name) == getattr(ours, f.name), f.name


def test_official_remote_code_is_kept_on_load_and_save(tmp_path):
    """A checkpoint with its own auto_map (the release ships configuration/modeling_bailing_moe_linear_v2.py) keeps
    auto_map and files byte for byte, saved in place or elsewhere; ours are added only without an auto_map."""
    official = {"AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config",
                "AutoModelForCausalLM": "modeling_bailing_moe_linear_v2.BailingMoeLinearV2ForCausalLM"}
    src = tmp_path / "official"
    save_model(_model(preset("tiny")), src)
    for f in FILES:
        os.remove(src / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = official
    (src / "config.json").write_text(json.dumps(cfg))
    code = {"configuration_bailing_moe_linear_v2.py": b"# official config\n",
            "modeling_bailing_moe_linear_v2.py": b"# official model\n", "helpers_v2.py": b"# imported by it\n"}
    for name, text in code.items():
        (src / name).write_bytes(text)

    def py_files(d):
        return {p.name: p.read_bytes() for p in Path(d).glob("*.py")}

    m = load_model(str(src))
    save_model(m, tmp_path / "copy")
    save_model(m, src)  # in place
    for d in (tmp_path / "copy", src):
        assert json.loads((d / "config.json").read_text())["auto_map"] == official
        assert py_files(d) == code
    # a model built from that config alone cannot know where the files are: config kept, a warning says so
    with pytest.warns(UserWarning, match="modeling_bailing_moe_linear_v2.py"):
        save_model(build_model(m.config, "cpu"), tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["auto_map"] == official
    assert py_files(tmp_path / "fresh") == {}


def test_our_remote_code_is_refreshed_and_idempotent(tmp_path):
    save_model(_model(preset("tiny")), tmp_path / "ck")
    (tmp_path / "ck" / FILES[1]).write_text("# an older version of ours\n")
    save_model(load_model(str(tmp_path / "ck")), tmp_path / "ck")
    here = Path(__file__).parents[1] / "ringlinear" / "hf_remote"
    assert (tmp_path / "ck" / FILES[1]).read_bytes() == (here / FILES[1]).read_bytes()
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_init_and_convert_write_our_remote_code(tmp_path):
    """`ringlinear init` and `convert` go through save_model; convert drops the source's auto_map (its remote code
    is for a softmax-only model) and gets ours."""
    from ringlinear.cli import main
    from ringlinear.convert import convert_softmax_to_hybrid

    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "init"), "--dtype", "fp32"]) == 0
    src = tmp_path / "softmax"
    save_model(_model(preset("tiny", layer_group_size=1)), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config"}
    (src / "config.json").write_text(json.dumps(cfg))
    convert_softmax_to_hybrid(str(src), str(tmp_path / "hybrid"), layer_group_size=3)
    for d in ("init", "hybrid"):
        assert json.loads((tmp_path / d / "config.json").read_text())["auto_map"] == AUTO_MAP
        assert all((tmp_path / d / f).is_file() for f in FILES)
