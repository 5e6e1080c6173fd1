"""The sampler's own logprobs as PPO's old logprobs (issue 24) on the CPU with a tiny fp32 model:

- with every alignment switch on, a token's logprob is bitwise the same sampled in a batch of 4 or alone, decoded or
  prefilled (prompt logprobs of prompt + completion), and equal to the trainer's forward on ragged packs;
- each switch matters: with all but one on, some of these equalities break (so a switch that is ignored fails);
- RL with old_logprobs "rollout" (no scoring pass, first ratio exactly 1) and TIS toward the sampler in scoring mode;
- prompts from JSON lines / a saved dataset with a `module:function` reward, and hostile inputs."""

import copy
import json
import math

import pytest
import torch

from ringlinear.config import preset
from ringlinear.engine.llm import LLM
from ringlinear.engine.sequence import SamplingParams
from ringlinear.model import init_model
from ringlinear.ops.batch_invariant import ITEMS, aligned_numerics
from ringlinear.rl.policy import PolicyTrainer
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import RolloutWorker, partition
from ringlinear.rl.scoring import completion_logprobs, pack_completions
from ringlinear.rl.tasks import PromptDataset, call_reward, load_reward
from ringlinear.tokenizer import byte_level_tokenizer

PROMPT_LENS = (5, 17, 40, 70)  # the longer ones prefill in 2-3 chunks of CHUNK tokens
CHUNK = 32
GEN = 20


@pytest.fixture(scope="module")
def model():
    return init_model(preset("tiny"), seed=0, device="cpu", dtype="float32")


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _logprobs(choice):
    return torch.tensor([lp[t].logprob for t, lp in zip(choice.token_ids, choice.logprobs)], dtype=torch.float64)


def _measure(model, spec):
    """Sampler logprobs in a batch of 4 and alone, the same tokens prefilled, and the trainer's, under `spec`."""
    llm = LLM(live_model=copy.deepcopy(model), device="cpu", max_num_seqs=8, max_num_batched_tokens=CHUNK,
              cpu_cache_gib=0.05, verbose=False, aligned_numerics=spec)
    prompts = _prompts()
    params = [SamplingParams(temperature=1.0, max_tokens=GEN, logprobs=0, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    batch = [o.outputs[0] for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], [sp])[0].outputs[0] for p, sp in zip(prompts, params)]
    assert all(a.token_ids == b.token_ids for a, b in zip(alone, batch))  # the same draws
    comps = [c.token_ids for c in batch]
    prefilled = []
    for p, c in zip(prompts, comps):  # the completion as prompt: each token's logprob from the prefill
        out = llm.generate([p + c], [SamplingParams(max_tokens=1, prompt_logprobs=0)])[0]
        prefilled.append(torch.tensor([out.prompt_logprobs[len(p) + j][t].logprob for j, t in enumerate(c)],
                                      dtype=torch.float64))
    with aligned_numerics(spec), torch.no_grad():
        packs = [[0, 1, 2], [3]]  # ragged packs
        train = [None] * 4
        for mb in packs:
            lp = completion_logprobs(model, pack_completions([prompts[i] for i in mb], [comps[i] for i in mb], "cpu"))
            for i, part in zip(mb, lp.split([len(comps[i]) for i in mb])):
                train[i] = part.double()
    cat = torch.cat
    return (cat([_logprobs(c) for c in batch]), cat([_logprobs(c) for c in alone]), cat(prefilled), cat(train))


def test_all_switches_make_sampler_equal_trainer_bitwise(model):
    batch, alone, prefilled, train = _measure(model, "all")
    assert torch.equal(batch, alone)  # batch 4 vs batch 1
    assert torch.equal(batch, prefilled)  # decode vs prefill
    assert torch.equal(batch, train)  # sampler vs trainer, ragged packs
    assert batch.numel() == GEN * len(PROMPT_LENS) and torch.isfinite(batch).all()


@pytest.mark.parametrize("item", ITEMS)
def test_each_switch_matters(model, item):
    if item == "rope":
        pytest.skip("the tiny model's fp32 RoPE agrees on these positions; test_rope_switch_reads_the_fp64_table")
    spec = ",".join(i for i in ITEMS if i != item)
    batch, alone, prefilled, train = _measure(model, spec)
    gaps = [float((batch - x).abs().max()) for x in (alone, prefilled, train)]
    assert max(gaps) > 0, f"without {item} everything still agrees: the switch has no effect"
    assert max(gaps) < 1e-5  # fp32: only rounding differs


def test_off_mode_sampler_close_to_trainer(model):
    batch, _, _, train = _measure(model, "off")
    assert (batch - train).abs().max() < 1e-5


# ---- RL ----------------------------------------------------------------------------------------------------------
SAMPLES = [{"prompt": "7+5=", "answer": "12"}, {"prompt": "x" * 50 + "3-4=", "answer": "-1"}]
GROUP = 2


def parity_reward(prompt, completion, sample):
    return float(len(completion) % 2)


def _rl(model, **kw):
    tok = byte_level_tokenizer()
    cfg = RLConfig(**{**dict(prompts_per_step=len(SAMPLES), group_size=GROUP, max_tokens=6, lr=1e-3, progress=False,
                             out_dir=None), **kw})
    worker = RolloutWorker(copy.deepcopy(model), tok, "cpu", max_num_seqs=8, max_num_batched_tokens=CHUNK,
                           cpu_cache_gib=0.05, aligned_numerics=cfg.aligned_numerics)
    trainer = PolicyTrainer(copy.deepcopy(model), cfg)
    packs = partition(len(SAMPLES) * GROUP, 1, 3)
    return cfg, worker, trainer, packs


def test_rollout_logprobs_as_old_logprobs(model):
    cfg, worker, trainer, packs = _rl(model, old_logprobs="rollout", aligned_numerics="all")
    batch = worker.rollout(SAMPLES, GROUP, parity_reward, packs, max_tokens=6, score=not trainer.rollout_is_old)
    assert batch.scoring_logprobs == []  # no scoring pass
    m = trainer.update(batch)
    assert m["mismatch/max_abs_logp_diff"] == 0.0 and m["sampling/max_abs_logp_diff"] == 0.0
    assert m["clip_frac"] == 0.0 and "tis_clip_frac" not in m


def test_rollout_mode_without_alignment_measures_the_gap(model):
    cfg, worker, trainer, packs = _rl(model, old_logprobs="rollout", aligned_numerics="off")
    batch = worker.rollout(SAMPLES, GROUP, parity_reward, packs, max_tokens=6, score=False)
    m = trainer.update(batch)
    assert 0.0 < m["mismatch/max_abs_logp_diff"] < 1e-4


def test_scoring_mode_corrects_toward_the_sampler(model):
    cfg, worker, trainer, packs = _rl(model, old_logprobs="scoring", tis_cap=1.5)
    assert trainer.loss_cfg.tis_cap == 1.5
    batch = worker.rollout(SAMPLES, GROUP, parity_reward, packs, max_tokens=6)
    batch.sampling_logprobs = [s - 1.0 for s in batch.sampling_logprobs]  # the sampler far less sure: w = e > cap
    m = trainer.update(batch)
    assert m["mismatch/max_abs_logp_diff"] == 0.0  # the ratio still divides by the scoring pass
    assert m["tis_clip_frac"] == 1.0 and abs(m["sampling/mean_abs_logp_diff"] - 1.0) < 1e-4


def test_config_checks():
    with pytest.raises(ValueError, match="old_logprobs"):
        RLConfig(old_logprobs="sampler")
    with pytest.raises(ValueError, match="old_logprobs"):
        RLConfig(aligned=False, old_logprobs="rollout")
    with pytest.raises(ValueError, match="aligned_numerics"):
        RLConfig(aligned_numerics="gemm,fastest")
    with pytest.raises(ValueError, match="reward"):
        RLConfig(prompts="p.jsonl")
    with pytest.raises(ValueError, match="sft_warmup_steps"):
        RLConfig(prompts="p.jsonl", reward="m:f", sft_warmup_steps=3)
    from ringlinear.engine.engine_config import EngineConfig

    with pytest.raises(ValueError, match="aligned_numerics"):
        EngineConfig(aligned_numerics="everything")


# ---- prompts and rewards -----------------------------------------------------------------------------------------
REWARD_MODULE = """
import math

def score(prompt, completion, sample):
    return float(sample["target"] in completion)

def boom(prompt, completion, sample):
    raise KeyError("no such field")

def nan(prompt, completion, sample):
    return math.nan

def text(prompt, completion, sample):
    return "high"
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "user_reward_mod.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_rl_run_from_jsonl_prompts_and_module_reward(tmp_path, reward_module):
    from ringlinear.rl.loop import RLRun

    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "target": str(a + 1)} for a in range(6)]
                 + [{"prompt": [{"role": "user", "content": "2+2="}], "target": "4"}])
    cfg = RLConfig(model="tiny", prompts=str(tmp_path / "p.jsonl"), reward="user_reward_mod:score", steps=2,
                   prompts_per_step=2, group_size=2, max_tokens=4, progress=False, out_dir=None,
                   engine_cpu_cache_gib=0.05, old_logprobs="rollout", aligned_numerics="all")
    run = RLRun(cfg)
    hist = run.run()
    assert len(hist) == 2 and all(h["mismatch/max_abs_logp_diff"] == 0.0 for h in hist)
    assert "time/score_s" in hist[0] and all(math.isfinite(h["reward_mean"]) for h in hist)


def test_cli_flags(tmp_path, reward_module):
    from ringlinear.cli import main

    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "target": "2"}, {"prompt": "3+1=", "target": "4"}])
    assert main(["rl", "--model", "tiny", "--prompts", str(tmp_path / "p.jsonl"), "--reward", "user_reward_mod:score",
                 "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "3",
                 "--old-logprobs", "rollout", "--aligned-numerics", "all", "--engine-cpu-cache-gib", "0.05",
                 "--no-progress", "--out", str(tmp_path / "run"), "--no-plot"]) == 0
    hist = json.loads((tmp_path / "run" / "history.json").read_text())["steps"]
    assert hist[0]["mismatch/max_abs_logp_diff"] == 0.0


def test_saved_dataset_and_chat_template(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"question": "5-2=", "target": "3"}, {"question": "1+8=", "target": "9"}]
                               ).save_to_disk(str(tmp_path / "ds"))
    tok = byte_level_tokenizer()
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    ds = PromptDataset(str(tmp_path / "ds"), "question", seed=0, tokenizer=tok, chat_template=template)
    got = sorted((s["prompt"], tok.decode(s["prompt_ids"])) for s in (ds.sample(), ds.sample()))
    assert got == [("1+8=", "<user>1+8=<a>"), ("5-2=", "<user>5-2=<a>")]
    assert {ds.sample()["prompt"], ds.sample()["prompt"]} == {"5-2=", "1+8="}  # a new pass, reshuffled


def test_hostile_inputs(tmp_path, reward_module):
    with pytest.raises(ValueError, match="reward.*cannot import"):
        load_reward("no_such_module_xyz:score")
    with pytest.raises(ValueError, match="reward.*no callable"):
        load_reward("user_reward_mod:missing")
    with pytest.raises(ValueError, match="reward.*cannot import"):
        load_reward(str(tmp_path / "missing.py") + ":score")
    assert load_reward(str(reward_module / "user_reward_mod.py") + ":score")("p", "a4", {"target": "4"}) == 1.0
    with pytest.raises(RuntimeError, match="reward='user_reward_mod:boom' raised.*KeyError"):
        call_reward(load_reward("user_reward_mod:boom"), "p", "c", {})
    with pytest.raises(ValueError, match="reward='user_reward_mod:nan' returned nan"):
        call_reward(load_reward("user_reward_mod:nan"), "p", "c", {})
    with pytest.raises(ValueError, match="not a number"):
        call_reward(load_reward("user_reward_mod:text"), "p", "c", {})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="prompts=.*line 2 is not JSON"):
        PromptDataset(str(bad))
    _write_jsonl(bad, [{"text": "a"}])
    with pytest.raises(ValueError, match="record 0 has no usable 'prompt'"):
        PromptDataset(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        PromptDataset(str(tmp_path / "nothing.jsonl"))
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match="prompts=.*is not UTF-8 text: byte 12"):
        PromptDataset(str(bad))
    bad.write_text('{"prompt": "a\u2028b"}\n', encoding="utf-8")  # a line separator inside a JSON string
    assert PromptDataset(str(bad)).records[0]["prompt"] == "a\u2028b"
    from ringlinear.rl.loop import RLRun

    _write_jsonl(bad, [{"prompt": "a"}])
    with pytest.raises(ValueError, match="chat_template.*no chat_template"):  # a preset has no template
        RLRun(RLConfig(model="tiny", prompts=str(bad), reward="user_reward_mod:score", chat_template=True,
                       progress=False, out_dir=None, engine_cpu_cache_gib=0.05))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        PromptDataset(str(tmp_path / "empty.jsonl"))


def test_chat_template_rollouts_from_a_checkpoint(tmp_path, reward_module):
    from ringlinear.hf import save_model
    from ringlinear.rl.loop import RLRun
    from ringlinear.tokenizer import tokenizer_config, tokenizer_files

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(init_model(preset("tiny"), seed=1), str(ckpt))
    for name, text in tokenizer_files(byte_level_tokenizer()).items():
        (ckpt / name).write_text(text)
    assert tokenizer_config(str(ckpt)).get("chat_template")
    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "2+2="}], "target": "4"},
                                        {"prompt": "3+3=", "target": "6"}])
    run = RLRun(RLConfig(model=str(ckpt), prompts=str(tmp_path / "p.jsonl"), reward="user_reward_mod:score",
                         chat_template=True, steps=1, prompts_per_step=2, group_size=2, max_tokens=3, progress=False,
                         out_dir=None, engine_cpu_cache_gib=0.05, old_logprobs="rollout", aligned_numerics="all"))
    batch, rec = run.collect()
    tok = run.tokenizer
    rendered = [tok.decode(ids) for ids in batch.prompt_ids]
    for r in rendered:  # the template wrapped each prompt (a plain string became one user message)
        raw = next(p for p in ("2+2=", "3+3=") if p in r)
        assert len(r) > len(raw)
    assert run.learn(batch, rec)["mismatch/max_abs_logp_diff"] == 0.0


def test_triton_kernels_through_the_engine_are_aligned():
    """The Triton kernels (interpreter) end to end: paged tables, the recurrent state pool, the expert blocks; a
    3-layer model and few tokens (the interpreter is slow)."""
    from ringlinear.ops.backend import use_backend

    small = init_model(preset("tiny").replace(num_hidden_layers=3, num_nextn_predict_layers=0), seed=0)
    prompts = [[5, 9, 11], list(range(2, 20))]  # the second prefills in two chunks
    params = [SamplingParams(temperature=1.0, max_tokens=3, logprobs=0, seed=i, ignore_eos=True) for i in range(2)]
    with use_backend("triton"):
        llm = LLM(live_model=copy.deepcopy(small), device="cpu", max_num_seqs=2, max_num_batched_tokens=16,
                  cpu_cache_gib=0.01, verbose=False, aligned_numerics="all", enable_prefix_caching=False)
        batch = [o.outputs[0] for o in llm.generate(prompts, params)]
        alone = [llm.generate([p], [sp])[0].outputs[0] for p, sp in zip(prompts, params)]
        for a, b in zip(alone, batch):
            assert a.token_ids == b.token_ids and torch.equal(_logprobs(a), _logprobs(b))
        with aligned_numerics("all"), torch.no_grad():
            train = completion_logprobs(small, pack_completions(prompts, [c.token_ids for c in batch], "cpu"))
    assert torch.equal(train.double(), torch.cat([_logprobs(c) for c in batch]))
