"""The engine's public API. `LLMEngine` takes requests and advances them one batched step at a time
(scheduler -> runner -> sampler -> stop checks); `LLM` is the offline front: `LLM(path).generate(prompts,
SamplingParams(...))`. Serves any RingLinear checkpoint in the official HF layout, or a live model (RL)."""

from __future__ import annotations

import functools
import itertools
import os
import time

import torch

from ringlinear.device import compute_dtype, default_device, parse_dtype
from ringlinear.engine.engine_config import EngineConfig
from ringlinear.engine.runner import ModelRunner
from ringlinear.engine.sampler import sample
from ringlinear.engine.scheduler import Scheduler
from ringlinear.engine.sequence import RequestError, RequestOutput, SamplingParams, Sequence
from ringlinear.engine.workers import EngineDeadError, inference_loader, needs_inference_loader
from ringlinear.ops.backend import forced_backend

__all__ = ["LLM", "LLMEngine", "EngineConfig", "EngineDeadError", "SamplingParams", "RequestOutput", "RequestError"]


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        self.workers = None  # the other tensor-parallel ranks (ringlinear.engine.workers)
        try:
            self._start(config, model, tokenizer)
        except BaseException:  # the workers must not outlive an engine that did not start
            self.shutdown()
            raise

    def _start(self, config: EngineConfig, model, tokenizer) -> None:
        from ringlinear.pretrained import load_pretrained
        from ringlinear.tokenizer import tokenizer_config

        config.validate()
        self.engine_config = config
        self.device = default_device(config.device)
        dtype = compute_dtype(self.device, config.dtype)
        self._chat_template = None
        if model is None:
            if config.model is None:
                config.fail("model", "a checkpoint directory is needed when no model is passed")
            loader = None
            if needs_inference_loader(config):  # several ranks, FP8 weights: each rank reads its slices
                loader, self.workers = inference_loader(config, self.device)
            loaded = load_pretrained(config.model, tokenizer=None, require_tokenizer=False, device=self.device,
                                     dtype=dtype, progress=config.verbose, model_loader=loader)
            model, tokenizer, self.eos_token_ids = loaded.model, tokenizer or loaded.tokenizer, loaded.eos_token_ids
            if tokenizer is not None:
                self._chat_template = tokenizer_config(config.model).get("chat_template")
        else:
            for name in ("tensor_parallel_size", "quantization"):
                if getattr(config, name) not in (1, None):
                    config.fail(name, "applies to a checkpoint the engine loads, not to a live model")
            eos = model.config.eos_token_id
            self.eos_token_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])
        model.eval()
        self.model = model
        self.config = model.config
        self.model_name = os.path.basename(os.path.normpath(config.model)) if config.model else "ringlinear"
        self.tokenizer = tokenizer
        kv_dtype = parse_dtype(config.kv_cache_dtype) if config.kv_cache_dtype else next(model.parameters()).dtype
        self.runner = (self.workers.runner(model, self.device, kv_dtype) if self.workers
                       else ModelRunner(model, self.device, kv_dtype))
        layout = self.runner.plan(config.max_num_seqs, config.max_num_batched_tokens, config.block_size,
                                  config.gpu_memory_utilization, int(config.cpu_cache_gib * 2**30))
        cache = self.runner.allocate(layout)
        limit = self.config.max_position_embeddings if config.max_model_len is None else config.max_model_len
        if config.max_model_len is not None and config.max_model_len > self.config.max_position_embeddings:
            config.fail("max_model_len", f"exceeds the model's max_position_embeddings="
                                         f"{self.config.max_position_embeddings}")
        if cache.kv and layout.max_cached_tokens < limit:
            if config.max_model_len is not None:
                config.fail("max_model_len", f"does not fit the KV cache ({layout.max_cached_tokens} tokens): raise "
                                             "the memory budget or lower it")
            limit = layout.max_cached_tokens
        self.max_model_len = limit
        self.runner.set_max_model_len(limit)
        if self.device.type == "cuda" and not config.enforce_eager:
            if forced_backend() == "torch":
                if config.verbose:  # the reference paged attention gathers pages with host-sized shapes
                    print("[ringlinear engine] backend torch: decode runs eagerly (no CUDA graphs)")
            else:
                self.runner.capture(config.max_num_seqs, config.verbose)
        self.scheduler = Scheduler(cache, config.max_num_seqs, config.max_num_batched_tokens)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._arrivals = itertools.count()
        self._generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.last_step_host_s = 0.0
        if config.verbose:
            print(f"[ringlinear engine] {self.model_name} on {self.device} ({dtype}): cache "
                  f"{layout.total_bytes / 2**30:.2f} GiB = {layout.num_slots} state slots "
                  f"({layout.state_bytes_per_slot / 2**20:.2f} MiB each) + {layout.num_blocks} KV blocks x "
                  f"{layout.block_size} tokens ({layout.max_cached_tokens} tokens, "
                  f"{layout.kv_bytes_per_token} B/token); admits {layout.num_slots} sequences, max_model_len "
                  f"{self.max_model_len}", flush=True)

    @property
    def failure(self) -> EngineDeadError | None:
        """Why the engine cannot continue (a tensor-parallel rank died), or None."""
        return None if self.workers is None else self.workers.failure

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op on one device); the engine cannot step after it."""
        if self.workers is not None:
            self.workers.shutdown()

    # ---- text -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it are parsed as special tokens (as vLLM does for a
        completion prompt). Chat messages go through `apply_chat_template`, which does not do that."""
        if self.tokenizer is None:
            raise RequestError("prompt", "this engine has no tokenizer: pass token ids")
        try:  # encode_batch, unlike encode, releases the GIL: a long text does not stall the engine's other threads
            return self.tokenizer.encode_batch([text])[0].ids
        except TypeError:  # the tokenizer takes only valid Unicode text
            raise RequestError("prompt", "is not valid Unicode text (a lone surrogate?)") from None

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True,
                            template_kwargs: dict | None = None, max_text_bytes: int | None = None) -> str | list[int]:
        """The checkpoint's chat template applied to `messages` (rendered in a sandbox, `ringlinear.chat_template`),
        as text, or with `tokenize` as token ids in which the messages' text never becomes a special token (feed
        those ids, not the text, to the engine). `template_kwargs` reach the template (enable_thinking=...). With
        `tokenize`, a rendering longer than `max_text_bytes` (UTF-8) is refused before it is tokenised."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str)
                                                  or m.get("content") is None and m.get("tool_calls"))
            if not content_ok or not isinstance(m.get("role"), str):
                raise RequestError("messages", f"message {i} must have string fields 'role' and 'content'")
        if self._chat_template is None:
            raise RequestError("messages", "the checkpoint's tokenizer has no chat_template")
        from ringlinear import chat_template

        try:
            if not tokenize:
                return chat_template.render(self._chat_template, messages, add_generation_prompt,
                                            {**self._chat_special_tokens, **(template_kwargs or {})})
            rendered = chat_template.render_chat(self.tokenizer, self._chat_template, messages, add_generation_prompt,
                                                 self._chat_special_tokens, template_kwargs)
        except chat_template.ChatTemplateError as e:
            raise RequestError("messages", str(e)) from None
        if max_text_bytes is not None and rendered.num_bytes > max_text_bytes:
            raise RequestError("messages", f"render to {rendered.num_bytes} bytes of text, more than "
                                           f"{max_text_bytes} (surely over the maximum length {self.max_model_len})")
        return rendered.encode()

    @functools.cached_property
    def _chat_special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... of tokenizer_config.json, which chat templates read (as transformers passes)."""
        from ringlinear.tokenizer import tokenizer_config

        cfg = tokenizer_config(self.engine_config.model) if self.engine_config.model else {}
        out = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[name] = value
        return out

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self._seqs:
            raise RequestError("request_id", f"{request_id!r} is already running")
        params.validate()
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError("prompt", f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise RequestError("prompt", "must be a string or a list of token ids")
        if not ids:
            raise RequestError("prompt", "is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError("prompt", f"{len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                                         f"maximum length {self.max_model_len}")
        seq = Sequence(request_id, ids, params, arrival=next(self._arrivals))
        if params.seed is not None:
            try:
                seq.generator = torch.Generator(device="cpu").manual_seed(params.seed)
            except (ValueError, RuntimeError):  # outside what a 64-bit generator seed holds
                raise RequestError("seed", f"must be in [-2**63, 2**64), got {params.seed}") from None
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self._pending.append(RequestOutput.of(seq))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by its tokens of this step; sample where a prompt or the last
        token was just computed. Returns the outputs of requests that got a token or finished."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        rows = [i for i, (seq, n) in enumerate(batch) if seq.num_computed + n == seq.num_tokens]
        logits = self.runner.execute(batch, rows)
        launched = time.perf_counter()  # the forward is queued on the device; what follows waits for it
        for seq, n in batch:
            seq.num_computed += n
        sampled = launched
        if rows:
            seqs = [batch[i][0] for i in rows]
            tokens, logps, errors = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                           self._generator)
            sampled = time.perf_counter()
            for seq, tok, lp, error in zip(seqs, tokens, logps, errors):
                if error is None:
                    try:
                        self._append(seq, tok, lp)
                    except Exception as e:  # this sequence's bad luck must not end the others
                        error = f"{type(e).__name__}: {e}"
                if error is not None:  # finish it alone: its client gets the error, the batch goes on
                    self.scheduler.finish(seq, "error")
                    self._seqs.pop(seq.request_id, None)
                out = RequestOutput.of(seq)
                out.error = error
                outputs.append(out)
        # host work of this step: scheduling and launching, then turning the sampled tokens into outputs (the
        # device's forward and the sampler's wait for it are not host work)
        self.last_step_host_s = (launched - t0) + (time.perf_counter() - sampled)
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        p = seq.params
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids or p.stop_token_ids and token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        ids = seq.output_token_ids[:-1] if reason == "stop" else seq.output_token_ids
        text = self.decode(ids) if self.tokenizer is not None else ""
        if p.stop:
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is not None:
            seq.text = text
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.request_id, None)
            return
        # while running, hold back what may still change: an incomplete UTF-8 character, a possible stop prefix
        hold = max((len(s) - 1 for s in p.stop), default=0) if p.stop else 0
        text = text.rstrip("\ufffd")
        seq.text = text[: len(text) - hold] if hold else text


class LLM:
    """Offline generation: `LLM(path).generate(prompts, SamplingParams(...))` -> one finished
    `RequestOutput` per prompt, in order."""

    def __init__(self, model: str | None = None, *, live_model=None, tokenizer=None, **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), model=live_model, tokenizer=tokenizer)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        self.engine.shutdown()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.engine.add_request(rid, prompt, p)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="req")
        t0, n_tok = time.perf_counter(), 0
        while len(done) < len(ids):
            for out in self.engine.step():
                n_tok += 1
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
        if bar is not None:
            bar.close()
        return [done[r] for r in ids]

    def chat(self, conversations: list[list[dict]], params: SamplingParams | None = None) -> list[RequestOutput]:
        return self.generate([self.engine.apply_chat_template(c, tokenize=True) for c in conversations], params)
