"""The rollout side of RL: the inference engine (`ringlinear.engine`) samples `group_size` completions per
prompt with per-token logprobs, the reward function scores them, and the engine's copy of the weights
scores the same tokens once more with the trainer's packed forward (`scoring.completion_logprobs`).

Two logprobs per completion token come back: `sampling_logprobs` (what the engine's sampler saw: chunked
prefill of the prompt, then one-token decode steps over the paged cache) and `scoring_logprobs` (one packed
prefill of prompt + completion, packed exactly as the trainer packs it). Weights arrive from the trainer in
memory (`load_weights`) or, across processes, from a checkpoint directory (`load_checkpoint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ringlinear.engine.llm import LLM
from ringlinear.engine.sequence import SamplingParams
from ringlinear.ops.backend import use_backend
from ringlinear.ops.batch_invariant import aligned_numerics
from ringlinear.rl.scoring import completion_logprobs, pack_completions
from ringlinear.rl.tasks import RewardFn, call_reward


def partition(num_seqs: int, minibatches: int, micro_batch_seqs: int) -> list[list[list[int]]]:
    """Sequence indices per minibatch (one optimizer step each), per micro-batch (one forward each). Fixed
    and contiguous: the engine's scoring pass and the trainer's forwards use these same packs."""
    if num_seqs % minibatches:
        raise ValueError(f"partition: {num_seqs} sequences do not split into {minibatches} minibatches")
    per = num_seqs // minibatches
    micro = micro_batch_seqs or per
    return [[list(range(s, min(s + micro, m0 + per))) for s in range(m0, m0 + per, micro)]
            for m0 in range(0, num_seqs, per)]


@dataclass
class RolloutBatch:
    """`prompts_per_step * group_size` sequences, groups contiguous (sequence i belongs to prompt
    i // group_size)."""

    samples: list[dict]  # one per prompt
    group_size: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    rewards: torch.Tensor  # [N] fp32
    sampling_logprobs: list[torch.Tensor]  # per sequence [len(completion)] fp32: the engine's sampler
    scoring_logprobs: list[torch.Tensor] = field(default_factory=list)  # engine scoring pass (same packs)
    packs: list[list[list[int]]] = field(default_factory=list)  # partition() of the sequences
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutWorker:
    """Owns an `LLM` over a live model (its own copy of the policy's weights, in the trainer's dtype)."""

    def __init__(self, model: nn.Module, tokenizer, device: str | torch.device, *, max_num_seqs: int,
                 max_num_batched_tokens: int = 2048, gpu_memory_utilization: float = 0.3,
                 cpu_cache_gib: float = 0.25, backend: str | None = None, seed: int = 0,
                 aligned_numerics: str = "off"):
        self.backend = backend
        self.aligned_numerics = aligned_numerics
        with use_backend(backend):  # the profiling forward runs on the engine's kernels too
            self.llm = LLM(live_model=model, tokenizer=tokenizer, device=str(device), max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens,
                           gpu_memory_utilization=gpu_memory_utilization, cpu_cache_gib=cpu_cache_gib, seed=seed,
                           verbose=False, aligned_numerics=aligned_numerics)
        self.model = self.llm.engine.model
        self.device = self.llm.engine.device

    # ---- weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, src: nn.Module) -> float:
        """Copy the trainer's parameters and persistent buffers (MoE expert biases) into the engine's model,
        in memory (device to device on one GPU), and forget the prefix cache (computed by the old weights).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        self.model.load_state_dict(src.state_dict())
        self.llm.reset_prefix_cache()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def load_checkpoint(self, path: str) -> float:
        """Weights from a checkpoint directory written by `ringlinear.hf.save_model` (the path for a
        trainer in another process): loaded onto the engine's device in its dtype, then copied in place."""
        from ringlinear.hf import load_model

        t0 = time.perf_counter()
        dtype = next(self.model.parameters()).dtype
        self.load_weights(load_model(path, device=self.device, dtype=dtype))
        return time.perf_counter() - t0

    # ---- rollouts -------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: list[SamplingParams]):
        with use_backend(self.backend):
            return self.llm.generate(prompts, params)

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              packs: list[list[list[int]]]) -> list[torch.Tensor]:
        """The engine-side scoring pass: per sequence, fp32 log p of its completion tokens under the engine's
        weights, computed pack by pack with the trainer's packed forward (`completion_logprobs`)."""
        out: list[torch.Tensor | None] = [None] * len(prompt_ids)
        with use_backend(self.backend), aligned_numerics(self.aligned_numerics):
            for mb in (mb for minibatch in packs for mb in minibatch):
                packed = pack_completions([prompt_ids[i] for i in mb], [completion_ids[i] for i in mb], self.device)
                lp = completion_logprobs(self.model, packed).float().cpu()
                for j, part in enumerate(lp.split([len(completion_ids[i]) for i in mb])):
                    out[mb[j]] = part
        return out

    def rollout(self, samples: list[dict], group_size: int, reward_fn: RewardFn, packs: list[list[list[int]]], *,
                max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                score: bool = True) -> RolloutBatch:
        """`group_size` sampled completions for each sample's prompt (completion j of prompt k draws with seed
        `seed + k * group_size + j`), their rewards, and (with `score`) the engine-side scoring pass over `packs`.

        A group is one request with n = group_size: the engine computes its prompt once and forks the sequence
        (state slot copied, KV blocks shared), rather than relying on the prefix cache, whose snapshot of a prompt
        exists only after one member has computed it, so members admitted in the same step would all miss."""
        params = [SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0, seed=seed + k * group_size) for k in range(len(samples))]
        t0 = time.perf_counter()
        outs = self.generate([s.get("prompt_ids") or s["prompt"] for s in samples], params)
        t1 = time.perf_counter()
        choices = [(o, c, s) for o, s in zip(outs, samples) for c in o.outputs]  # groups contiguous, in order
        rewards = [call_reward(reward_fn, s["prompt"], c.text, s) for _, c, s in choices]
        batch = RolloutBatch(
            samples=samples, group_size=group_size,
            prompt_ids=[o.prompt_token_ids for o, _, _ in choices], completion_ids=[c.token_ids for _, c, _ in choices],
            texts=[c.text for _, c, _ in choices], finish_reasons=[c.finish_reason for _, c, _ in choices],
            rewards=torch.tensor(rewards, dtype=torch.float32),
            sampling_logprobs=[torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                                            dtype=torch.float32) for _, c, _ in choices], packs=packs,
        )
        t2 = time.perf_counter()
        if score:
            batch.scoring_logprobs = self.score(batch.prompt_ids, batch.completion_ids, packs)
        batch.timings = {"time/generate_s": t1 - t0, "time/reward_s": t2 - t1,
                         "time/score_s": time.perf_counter() - t2}
        return batch
