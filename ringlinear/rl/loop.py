"""The RL loop: sample prompts from a task -> rollouts through the engine -> rewards -> policy update through
the trainer -> weights copied to the engine in memory -> log. Writes `history.json` (one record of metrics
per step), `reward.png` (the reward curve) and `config.json` under `out_dir`.

Separate processes (trainer and engine on different GPUs or hosts): after each step the trainer writes the
policy with `ringlinear.hf.save_model(model, DIR)` and the engine process calls
`RolloutWorker.load_checkpoint(DIR)` (or starts with `LLM(DIR)`); the rollout batch travels back as token
ids, logprobs and rewards. In one process, as here, `RolloutWorker.load_weights` copies device to device.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from ringlinear.device import compute_dtype, default_device
from ringlinear.plots import plot_rewards
from ringlinear.pretrained import load_pretrained
from ringlinear.rl.policy import PolicyTrainer, sft_warmup
from ringlinear.rl.rl_config import RLConfig
from ringlinear.rl.rollout import RolloutBatch, RolloutWorker, partition
from ringlinear.rl.tasks import TASKS, PromptDataset, RewardFn, call_reward, load_reward
from ringlinear.tokenizer import tokenizer_config


def chat_template_of(model: str) -> str | None:
    """The chat template of a checkpoint directory's tokenizer_config.json (None for presets or without one)."""
    return tokenizer_config(model).get("chat_template") if os.path.isdir(model) else None


class RLRun:
    """Everything one run holds: the policy trainer, the rollout worker (own copy of the weights), the task
    and its reward. `step()` does one RL step and returns its metrics; `run()` does them all."""

    def __init__(self, cfg: RLConfig, reward_fn: RewardFn | None = None):
        cfg.validate()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.device = default_device(cfg.device)
        dtype = compute_dtype(self.device, cfg.compute_dtype)
        loaded = load_pretrained(cfg.model, overrides=cfg.model_overrides, tokenizer=cfg.tokenizer, seed=cfg.seed,
                                 device=self.device, dtype="float32")
        model, self.tokenizer, self.eos_id = loaded.model, loaded.tokenizer, loaded.eos_token_id
        if cfg.prompts:
            template = None
            if cfg.chat_template:
                template = chat_template_of(cfg.model)
                if template is None:
                    cfg.fail("chat_template", f"model {cfg.model!r} has no chat_template in tokenizer_config.json")
            make = lambda seed: PromptDataset(cfg.prompts, cfg.prompt_key, seed, self.tokenizer, template)  # noqa: E731
        else:
            if cfg.chat_template:
                cfg.fail("chat_template", "applies to prompts from a file (the built-in tasks are plain text)")
            make = lambda seed: TASKS[cfg.task](seed=seed, **cfg.task_kwargs)  # noqa: E731
        self.task = make(cfg.seed)
        held_out = make(cfg.seed + 7919)  # its own order (a file's prompts are not split: held out by order only)
        self.eval_samples = [held_out.sample() for _ in range(cfg.eval_prompts)] if cfg.eval_every else []
        self.reward_fn = reward_fn or (load_reward(cfg.reward) if cfg.reward else self.task.reward)
        self.sft_losses = sft_warmup(model, self.task, self.tokenizer, self.eos_id, cfg.sft_warmup_steps, cfg.sft_lr,
                                     cfg.sft_batch, progress=cfg.progress) if cfg.sft_warmup_steps else []
        self.trainer = PolicyTrainer(model, cfg, dtype)
        n = cfg.prompts_per_step * cfg.group_size
        self.packs = partition(n, cfg.minibatches, cfg.micro_batch_seqs)
        self.worker = RolloutWorker(
            copy.deepcopy(self.trainer.model), self.tokenizer, self.device,
            max_num_seqs=max(n, cfg.eval_prompts if cfg.eval_every else 1),
            max_num_batched_tokens=cfg.engine_max_num_batched_tokens,
            gpu_memory_utilization=cfg.engine_memory_utilization, cpu_cache_gib=cfg.engine_cpu_cache_gib,
            backend=cfg.scoring_backends[1], seed=cfg.seed, aligned_numerics=cfg.aligned_numerics)
        self.history: list[dict] = []  # one record per RL step
        self.evals: list[dict] = []  # {"step": updates done, "eval_accuracy": greedy accuracy}
        self.step_idx = 0

    def evaluate(self) -> float:
        """Greedy accuracy (mean reward) on the held-out samples."""
        from ringlinear.engine.sequence import SamplingParams

        outs = self.worker.generate([s.get("prompt_ids") or s["prompt"] for s in self.eval_samples],
                                    SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens))
        return sum(call_reward(self.reward_fn, s["prompt"], o.outputs[0].text, s) for s, o in zip(self.eval_samples, outs)) / len(outs)

    def collect(self) -> tuple[RolloutBatch, dict]:
        """This step's prompts -> rollout batch (sampled, rewarded, scored by the engine) + reward statistics."""
        cfg = self.cfg
        if cfg.eval_every and self.step_idx % cfg.eval_every == 0:
            self.evals.append({"step": self.step_idx, "eval_accuracy": self.evaluate()})
        samples = [self.task.sample() for _ in range(cfg.prompts_per_step)]
        seed = cfg.seed * 1_000_003 + self.step_idx * cfg.prompts_per_step * cfg.group_size
        batch = self.worker.rollout(samples, cfg.group_size, self.reward_fn, self.packs, max_tokens=cfg.max_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                    score=not self.trainer.rollout_is_old)
        r = batch.rewards.view(-1, cfg.group_size)
        rec = {
            "step": self.step_idx + 1,
            "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
            "groups_all_same": float((r.max(-1).values == r.min(-1).values).float().mean()),
            "completion_len": batch.num_tokens / batch.num_seqs,
            "stop_frac": sum(f == "stop" for f in batch.finish_reasons) / batch.num_seqs,
            "example": {"prompt": samples[0]["prompt"][-80:], "completion": batch.texts[0],
                        "answer": samples[0].get("answer")},
            **batch.timings,
        }
        return batch, rec

    def learn(self, batch: RolloutBatch, rec: dict) -> dict:
        """Policy update on `batch`, then the new weights to the engine; completes and logs `rec`."""
        t0 = time.perf_counter()
        rec.update(self.trainer.update(batch))
        rec["time/weight_sync_s"] = self.worker.load_weights(self.trainer.model)
        rollout_s = sum(batch.timings.values())  # generate + reward + engine scoring
        rec["time/step_s"] = rollout_s + time.perf_counter() - t0
        self.step_idx += 1
        self.history.append(rec)
        return rec

    def step(self) -> dict:
        return self.learn(*self.collect())

    def run(self) -> list[dict]:
        cfg = self.cfg
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step_idx, desc="rl", unit="step")
        while self.step_idx < cfg.steps:
            rec = self.step()
            if bar is not None:
                bar.set_postfix({"reward": f"{rec['reward_mean']:.3f}",
                                 "|dlogp|max": f"{rec['mismatch/max_abs_logp_diff']:.1e}",
                                 "sampling|dlogp|max": f"{rec['sampling/max_abs_logp_diff']:.1e}"})
                bar.update(1)
        if bar is not None:
            bar.close()
        if cfg.eval_every and (not self.evals or self.evals[-1]["step"] != self.step_idx):
            self.evals.append({"step": self.step_idx, "eval_accuracy": self.evaluate()})
        if cfg.out_dir:
            self.save(cfg.out_dir)
        return self.history

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.cfg.to_dict(), f, indent=2)
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump({"sft_losses": self.sft_losses, "steps": self.history, "evals": self.evals}, f, indent=1)
        if self.cfg.plot:
            plot_rewards({"reward": (self.history, self.evals)}, os.path.join(out_dir, "reward.png"))
