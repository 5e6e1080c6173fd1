"""The engine's public API. `LLMEngine` takes requests and advances them one batched step at a time
(scheduler -> runner -> sampler -> stop checks); `LLM` is the offline front: `LLM(path).generate(prompts,
SamplingParams(...))`. Serves any RingLinear checkpoint in the official HF layout, or a live model (RL)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time

import torch

from ringlinear.device import compute_dtype, default_device, parse_dtype
from ringlinear.engine.engine_config import EngineConfig
from ringlinear.engine.prefix_cache import PrefixCache
from ringlinear.engine.runner import ModelRunner
from ringlinear.engine.sampler import GREEDY_BELOW, TokenHistory, make_logprobs, sample, token_logprobs
from ringlinear.engine.scheduler import Scheduler
from ringlinear.engine.sequence import (
    CompletionOutput,
    Logprob,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    Sequence,
    SequenceStatus,
)
from ringlinear.engine.spec_decode import SpecStats, accept, draft, may_speculate
from ringlinear.engine.workers import EngineDeadError, inference_loader, needs_inference_loader
from ringlinear.ops.backend import forced_backend
from ringlinear.ops.batch_invariant import parse_alignment

__all__ = ["LLM", "LLMEngine", "EngineConfig", "EngineDeadError", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "RequestError"]


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
            for name in ("tensor_parallel_size", "quantization", "load_format"):
                if getattr(config, name) not in (1, None, "auto"):
                    config.fail(name, "applies to a checkpoint the engine loads, not to a live model")
            eos = model.config.eos_token_id
            self.eos_token_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])
        model.eval()
        self.model = model
        self.config = model.config
        k = config.num_speculative_tokens
        if k and not len(model.model.mtp):
            config.fail("num_speculative_tokens", "needs a model with MTP layers (num_nextn_predict_layers >= 1; this "
                                                  f"model has {model.config.num_nextn_predict_layers} and "
                                                  f"{len(model.model.mtp)} loaded): use 0")
        self.model_name = os.path.basename(os.path.normpath(config.model)) if config.model else "ringlinear"
        self.tokenizer = tokenizer
        kv_dtype = parse_dtype(config.kv_cache_dtype) if config.kv_cache_dtype else next(model.parameters()).dtype
        self.runner = (self.workers.runner(model, self.device, kv_dtype) if self.workers
                       else ModelRunner(model, self.device, kv_dtype, mtp_kv_layers=1 if k else 0))
        self.runner.alignment = parse_alignment(config.aligned_numerics)
        interval = config.prefix_state_interval if config.enable_prefix_caching else None
        layout = self.runner.plan(config.max_num_seqs, config.max_num_batched_tokens, config.block_size,
                                  config.gpu_memory_utilization, int(config.cpu_cache_gib * 2**30), interval)
        cache = self.runner.allocate(layout)
        if interval and layout.num_snapshots:
            cache.prefix = PrefixCache(cache, interval)
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
                self.runner.capture(config.max_num_seqs, config.verbose, verify_length=k + 1 if k else 0)
        self.scheduler = Scheduler(cache, config.max_num_seqs, config.max_num_batched_tokens, k)
        self.spec_stats = SpecStats()
        self._spec_logged = (time.monotonic(), SpecStats())  # the verbose log's last line: when, and the counts
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []
        self._texts: dict[int, str] = {}
        self.history = TokenHistory(layout.num_slots, self.config.vocab_size, self.device)
        self._arrivals = itertools.count()
        self._generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.last_step_host_s = 0.0
        if config.verbose:
            if cache.prefix is not None:
                prefix = (f"; prefix cache: {layout.num_snapshots} state snapshots "
                          f"({layout.snapshot_bytes / 2**20:.2f} MiB each, one per {interval} tokens of KV; kept "
                          f"every {interval} tokens and at the end of each prompt and sequence)")
            elif config.enable_prefix_caching:
                prefix = ("; prefix cache off: " + ("an all-linear model has no KV blocks to key prefixes by"
                                                     if not cache.kv else "the budget holds no snapshot"))
            else:
                prefix = "; prefix cache off"
            if k:
                prefix += (f"; speculative decoding: {k} MTP draft tokens per step (depth-1 chain), verified in "
                           "one target forward")
            print(f"[ringlinear engine] {self.model_name} on {self.device} ({dtype}): cache "
                  f"{layout.total_bytes / 2**30:.2f} GiB = {layout.num_slots} state slots "
                  f"({layout.state_bytes_per_slot / 2**20:.2f} MiB each) + {layout.num_blocks} KV blocks x "
                  f"{layout.block_size} tokens ({layout.max_cached_tokens} tokens, "
                  f"{layout.kv_bytes_per_token} B/token){prefix}; admits {layout.num_slots} sequences, "
                  f"max_model_len {self.max_model_len}", flush=True)

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
        if request_id in self._requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        params.validate()
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and set(map(type, prompt)) <= {int}:  # C-speed over long prompts
            ids = list(prompt)
            if ids and not (0 <= min(ids) and max(ids) < self.config.vocab_size):
                bad = next(t for t in ids if not 0 <= t < self.config.vocab_size)
                raise RequestError("prompt", f"token id {bad} outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise RequestError("prompt", "must be a string or a list of token ids")
        if not ids:
            raise RequestError("prompt", "is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError("prompt", f"{len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                                         f"maximum length {self.max_model_len}")
        if params.n > self.engine_config.max_num_seqs:
            raise RequestError("n", f"{params.n} choices exceed max_num_seqs={self.engine_config.max_num_seqs} "
                                    "(the choices of a request run together)")
        V = self.config.vocab_size
        for name, ids_ in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids or ())):
            bad = [t for t in ids_ if t >= V]
            if bad:
                raise RequestError(name, f"token id {bad[0]} outside the vocabulary [0, {V})")
        generators = [None] * params.n
        if params.seed is not None:
            try:  # choice i draws with seed + i (as vLLM)
                generators = [torch.Generator(device="cpu").manual_seed(params.seed + i) for i in range(params.n)]
            except (ValueError, RuntimeError):  # outside what a 64-bit generator seed holds
                raise RequestError("seed", f"must be in [-2**63, 2**64 - n), got {params.seed}") from None
        req = Request(request_id, text, ids, params, generators=generators)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        # one sequence computes the prompt for all n choices (it holds their n seats) and is forked after it
        seq = Sequence(request_id, ids, params, arrival=next(self._arrivals), generator=generators[0],
                       seats=params.n)
        req.seqs.append(seq)
        self.scheduler.add(seq)
        self._requests[request_id] = req

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self._complete(req, "abort")
        self._pending.append(RequestOutput.of(req))

    def _complete(self, req: Request, reason: str, error: str | None = None) -> None:
        """Give a request that ends before its first sequence was forked its other n - 1 choices, finished."""
        for i in range(len(req.seqs), req.params.n):
            seq = Sequence(req.request_id, req.prompt_token_ids, req.params, index=i, error=error,
                           status=SequenceStatus.FINISHED, finish_reason=reason)
            req.seqs.append(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: call it when the weights change (RL), or the cache would serve states and
        KV computed by the old ones."""
        if self.scheduler.prefix is not None:
            self.scheduler.prefix.reset()

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by its tokens of this step; sample where a prompt or the last
        token was just computed. Returns the outputs of requests that got a token or finished."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        if self.engine_config.num_speculative_tokens:
            outputs.extend(self._speculative_step(batch))
            self.last_step_host_s = time.perf_counter() - t0  # includes the waits for the device
            return outputs
        rows = [i for i, (seq, n) in enumerate(batch) if seq.num_computed + n == seq.num_tokens]
        prompt_rows, token_rows = self._prompt_logprob_rows(batch)
        logits = self.runner.execute(batch, rows, token_rows or None)
        for seq, n in batch:
            seq.num_computed += n
        prefix = self.scheduler.prefix
        if prefix is not None:  # right after the forward, before a slot or a last block changes
            prefix.take([seq for seq, _ in batch if prefix.due(seq)])
        launched = self._sampled_at = time.perf_counter()  # the forward is queued; what follows waits for it
        if token_rows:
            self._prompt_logprobs(prompt_rows, logits[len(rows):])
            logits = logits[: len(rows)]
        touched: dict[str, Request] = {}
        if rows:
            seqs = [batch[i][0] for i in rows]
            self._sample(seqs, logits, touched)
        outputs.extend(RequestOutput.of(req) for req in touched.values())
        # host work of this step: scheduling and launching, then turning the sampled tokens into outputs (the
        # device's forward and the sampler's wait for it are not host work)
        self.last_step_host_s = (launched - t0) + (time.perf_counter() - self._sampled_at)
        return outputs

    # ---- speculative decoding (docs/architecture.md, "Speculative decoding") ----------------------------------
    def _speculative_step(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """A step where sequences holding a draft verify it: the MTP chain completes their k drafts, one target
        forward computes every scheduled token (verify rows first), the drafts are accepted or rejected, the
        verified linear states advanced by what was kept, the rejected tokens' blocks returned, and the MTP run over
        every position computed this step (its KV, and the next first draft of each decoding sequence)."""
        verify = [(s, n) for s, n in batch if s.draft_tokens]
        batch = verify + [(s, n) for s, n in batch if not s.draft_tokens]
        nv = len(verify)
        self._chain_drafts([s for s, _ in verify])
        rows = [i for i, (seq, n) in enumerate(batch) if i >= nv and seq.num_computed + n == seq.num_tokens]
        prompt_rows, token_rows = self._prompt_logprob_rows(batch)
        hidden, logits, ctx = self.runner.execute_verify(batch, nv, rows, token_rows or None)
        starts = [s.num_computed for s, _ in batch]
        for seq, n in batch[nv:]:
            seq.num_computed += n
        L = self.engine_config.num_speculative_tokens + 1
        sched, touched = self.scheduler, {}
        sched.defer_release = True
        try:
            if token_rows:
                self._prompt_logprobs(prompt_rows, logits[len(rows) + nv * L :])
            if rows:
                self._sample([batch[i][0] for i in rows], logits[: len(rows)], touched)
            kept = self._verify(verify, logits[len(rows) : len(rows) + nv * L].view(nv, L, logits.shape[-1]), touched)
            if nv:
                ctx.commit(torch.tensor(kept, dtype=torch.int32).to(self.device, non_blocking=True))
            counts = kept + [n for _, n in batch[nv:]]
            self._mtp_catch_up(batch, starts, counts, hidden, nv)
            prefix = sched.prefix
            if prefix is not None:
                prefix.take([s for s, _ in batch if s.status == SequenceStatus.RUNNING and prefix.due(s)])
            for seq, _ in verify:
                if seq.status == SequenceStatus.RUNNING:
                    sched.cache.truncate(seq)
        finally:
            sched.defer_release = False
            sched.release_finished()
        self._log_spec_stats()
        return [RequestOutput.of(req) for req in touched.values()]

    def _log_spec_stats(self, every_s: float = 10.0) -> None:
        """With `verbose`, every `every_s` seconds of work: the acceptance rate and tokens per verify step since the
        last line and since start."""
        when, last = self._spec_logged
        now, st = time.monotonic(), self.spec_stats
        if not self.engine_config.verbose or now - when < every_s or st.verify_steps == last.verify_steps:
            return
        delta = SpecStats(*(a - b for a, b in zip(dataclasses.astuple(st), dataclasses.astuple(last))))
        print(f"[ringlinear engine] speculative decoding: acceptance {delta.acceptance_rate:.3f}, "
              f"{delta.tokens_per_step:.2f} tokens per verify step over the last {now - when:.0f} s "
              f"({st.acceptance_rate:.3f}, {st.tokens_per_step:.2f} since start)", flush=True)
        self._spec_logged = (now, dataclasses.replace(st))

    def _verify(self, verify: list[tuple[Sequence, int]], logits: torch.Tensor, touched: dict[str, Request]
                ) -> list[int]:
        """Accept or reject the drafts of `verify` (logits [N, k + 1, V]), append the emitted tokens up to a stop;
        returns how many of each sequence's k + 1 computed positions it keeps (= tokens appended)."""
        if not verify:
            return []
        seqs = [s for s, _ in verify]
        params = [s.params for s in seqs]
        gens = [s.generator if s.generator is not None else self._generator for s in seqs]
        tokens, num_acc, errors = accept(logits, [s.draft_tokens for s in seqs], [s.draft_probs for s in seqs],
                                         params, gens)
        L = logits.shape[1]
        want = [p.logprobs for p in params for _ in range(L)]
        chosen = None
        if any(p.logprobs is not None for p in params):
            ids = [t[j] if j < len(t) else 0 for t in tokens for j in range(L)]
            logp = torch.log_softmax(logits.reshape(len(seqs) * L, -1).float(), dim=-1)
            chosen, ranks, top = token_logprobs(logp, torch.tensor(ids, device=logp.device), want)
        kept = []
        st = self.spec_stats
        for i, seq in enumerate(seqs):
            seq.clear_drafts()
            n = 0
            req = self._requests.get(seq.request_id)
            if errors[i] is not None:
                seq.error = errors[i]
                self.scheduler.finish(seq, "error")
            else:
                st.verify_steps += 1
                st.draft_tokens += L - 1
                st.accepted_tokens += num_acc[i]
                for j, tok in enumerate(tokens[i]):
                    r = i * L + j
                    lp = None
                    if seq.params.logprobs is not None:
                        lp = make_logprobs(tok, chosen[r], ranks[r], top[r], self._token_text)
                    self._append(seq, tok, chosen[r] if chosen is not None else 0.0, lp)
                    n += 1
                    if seq.is_finished:
                        break
                st.emitted_tokens += n
            kept.append(n)
            seq.num_computed += n
            if req is not None:
                touched[req.request_id] = req
                if req.is_finished:
                    del self._requests[req.request_id]
        return kept

    def _mtp_catch_up(self, batch: list[tuple[Sequence, int]], starts: list[int], counts: list[int],
                      hidden: torch.Tensor, num_verify: int = 0) -> None:
        """Run the MTP over the positions each sequence kept this step (position t: the target's hidden state at t
        and the token t + 1, now known), writing its KV there; a sequence that decodes next step drafts its first
        token from the MTP output at its last position.

        The first `num_verify` sequences verified k + 1 positions: the MTP runs over all k + 1 of them whatever was
        accepted (a rejected position gets token 0; its KV lies past the sequence's length, overwritten before it is
        read, as the target's), so its shapes depend on the batch alone, never on acceptance: no new kernel
        specialisation per step on the GPU, and verify-only steps replay a CUDA graph (`VerifyGraphs.mtp`)."""
        k = self.engine_config.num_speculative_tokens
        L = k + 1
        if num_verify and num_verify == len(batch) and getattr(self.runner, "last_verify_graph", False):
            # verify-only step that replayed the verify graph: the catch-up graph over the same static positions
            spans = [seq for seq, _ in batch]
            next_ids = [t for (seq, _), s, c in zip(batch, starts, counts)
                        for t in (seq.token_ids[s + 1 : s + c + 1] + [0] * (L - c))]
            lasts = [i * L + c - 1 for i, c in enumerate(counts)]
            ok = [c > 0 and seq.error is None and seq.slot >= 0 for (seq, _), c in zip(batch, counts)]
            h, logits = self.runner.verify_graphs.mtp(next_ids)
        else:
            rows, next_ids, lens, pos, slots, spans, lasts, ok = [], [], [], [], [], [], [], []
            offset = 0
            for i, ((seq, n), start, count) in enumerate(zip(batch, starts, counts)):
                if count and seq.error is None and seq.slot >= 0 and len(seq.token_ids) > start + count:
                    m = L if i < num_verify else count  # verify rows: all k + 1 positions (fixed shapes)
                    lasts.append(len(rows) + count - 1)
                    rows.extend(range(offset, offset + m))
                    next_ids.extend(seq.token_ids[start + 1 : start + count + 1] + [0] * (m - count))
                    lens.append(m)
                    pos.append(start)
                    slots.append(seq.slot)
                    spans.append(seq)
                    ok.append(True)
                offset += n
            if not spans:
                return
            h = self.runner.mtp_forward(hidden.index_select(0, torch.tensor(rows, device=hidden.device)), next_ids,
                                        lens, pos, slots)
            logits = None
        drafting = [i for i, s in enumerate(spans) if ok[i] and s.status == SequenceStatus.RUNNING and s.seats == 1
                    and s.num_computed == s.num_tokens - 1 and s.num_tokens + k <= self.max_model_len
                    and may_speculate(s.params, s.num_outputs)]
        if not drafting:
            return
        idx = torch.tensor([lasts[i] for i in drafting], device=h.device)
        last = h.index_select(0, idx)
        logits = self.runner.mtp_logits(last) if logits is None else logits.index_select(0, idx)
        seqs = [spans[i] for i in drafting]
        tokens, probs = draft(logits, [s.params for s in seqs],
                              [s.generator if s.generator is not None else self._generator for s in seqs])
        for j, seq in enumerate(seqs):
            seq.draft_tokens, seq.draft_probs, seq.mtp_hidden = [tokens[j]], [probs[j]], last[j]

    def _chain_drafts(self, seqs: list[Sequence]) -> None:
        """Complete the drafts of `seqs` (scheduled to verify; blocks grown for k + 1 positions) to k tokens: MTP
        depth 1 chained on its own output, draft j + 1 from (its hidden output at the previous position, draft j)."""
        k = self.engine_config.num_speculative_tokens
        if not seqs or k < 2:
            return
        vg = getattr(self.runner, "verify_graphs", None)
        if (vg is not None and vg.has_chain and len(seqs) <= vg.max_batch
                and all(s.params.temperature < GREEDY_BELOW and not s.params.logit_bias for s in seqs)):
            # greedy drafts without logit_bias: argmax(logits) on the device, the whole chain in one graph
            for seq, tokens in zip(seqs, vg.chain(seqs)):
                seq.draft_tokens.extend(tokens)
                seq.draft_probs.extend([None] * len(tokens))
            return
        h = torch.stack([s.mtp_hidden for s in seqs])
        slots = [s.slot for s in seqs]
        gens = [s.generator if s.generator is not None else self._generator for s in seqs]
        for j in range(1, k):
            pos = [s.num_computed + j - 1 for s in seqs]
            h = self.runner.mtp_forward(h, [s.draft_tokens[-1] for s in seqs], [1] * len(seqs), pos, slots)
            tokens, probs = draft(self.runner.mtp_logits(h), [s.params for s in seqs], gens)
            for i, seq in enumerate(seqs):
                seq.draft_tokens.append(tokens[i])
                seq.draft_probs.append(probs[i])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, touched: dict[str, Request]) -> None:
        """Sample one token for each of `seqs` (rows of `logits`), append it, check its stops. The first sequence
        of a request with n > 1, its prompt just computed, samples all n choices from its logits (choice i with
        its own generator) and is forked into the other n - 1."""
        reqs = [self._requests[s.request_id] for s in seqs]
        rows = [i for i, s in enumerate(seqs) for _ in range(s.seats)]  # n rows for a sequence to fork
        choices = [c for s in seqs for c in range(s.seats)]
        if len(rows) != len(seqs):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        samplers = [seqs[i] for i in rows]  # whose cache and history each row's logits come from
        params = [s.params for s in samplers]
        stop_ids = [self._stop_ids(s.params) if s.params.min_tokens > s.num_outputs else [] for s in samplers]
        pen_rows = [i for i, p in enumerate(params) if p.penalised]
        penalties = self.history.gather(samplers, pen_rows) if pen_rows else None
        generators = [reqs[i].generators[c] if seqs[i].seats > 1 else seqs[i].generator
                      for i, c in zip(rows, choices)]
        out = sample(logits, params, generators, self._generator,
                     num_outputs=[s.num_outputs for s in samplers], stop_ids=stop_ids, penalties=penalties)
        self._sampled_at = time.perf_counter()
        owners = list(samplers)  # the sequence each row's token goes to
        for i, seq in enumerate(seqs):
            if seq.seats > 1:
                self._fork(seq, reqs[i], [j for j, r in enumerate(rows) if r == i], out.errors, owners)
        if pen_rows:
            self.history.append(owners, out.tokens)
        for i, seq in enumerate(owners):
            error = out.errors[i]
            if error is None:
                try:
                    lp = None
                    if seq.params.logprobs is not None:
                        lp = make_logprobs(out.tokens[i], out.logprobs[i], out.ranks[i], out.top[i], self._token_text)
                    self._append(seq, out.tokens[i], out.logprobs[i], lp)
                except Exception as e:  # this sequence's bad luck must not end the others
                    error = f"{type(e).__name__}: {e}"
            if error is not None:  # finish it alone: its client gets the error, the batch goes on
                seq.error = error
                self.scheduler.finish(seq, "error")
            req = self._requests.get(seq.request_id)
            if req is not None:
                touched[req.request_id] = req
                if req.is_finished:
                    del self._requests[req.request_id]

    def _fork(self, parent: Sequence, req: Request, rows: list[int], errors: list[str | None],
              owners: list[Sequence]) -> None:
        """`parent` (choice 0) has sampled rows[c] for choice c: the other choices become sequences of their own
        sharing its cache (a state slot each, copied; its blocks shared, copy-on-write). Its n seats guarantee
        the slots."""
        children = []
        for c, row in enumerate(rows[1:], start=1):
            child = Sequence(req.request_id, req.prompt_token_ids, req.params, arrival=parent.arrival, index=c,
                             generator=req.generators[c], num_cached_tokens=parent.num_cached_tokens,
                             prefix_node=parent.prefix_node)
            req.seqs.append(child)
            owners[row] = child
            if errors[row] is None:
                children.append(child)
        self.scheduler.cache.fork(parent, children)
        self.scheduler.add_running(children)
        parent.seats = 1

    def _stop_ids(self, p: SamplingParams) -> list[int]:
        """Tokens that end a sequence of these parameters (masked while fewer than min_tokens were generated)."""
        return sorted((set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids or ()))

    def _token_text(self, token: int) -> str | None:
        """The text of one token (special tokens included), for logprobs; cached (the vocabulary bounds it)."""
        if self.tokenizer is None:
            return None
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    # ---- prompt logprobs ---------------------------------------------------------------------------
    def _prompt_logprob_rows(self, batch: list[tuple[Sequence, int]]) -> tuple[list[tuple[Request, int, int]],
                                                                                list[int]]:
        """For requests that asked prompt logprobs: (request, first position, count) of the prompt positions of
        this batch whose logprobs are not known yet, and their indices among the batch's packed tokens."""
        prompt_rows, token_rows, offset = [], [], 0
        known: dict[str, int] = {}  # positions whose logprobs are known or claimed by an earlier row
        for seq, n in batch:
            req = self._requests.get(seq.request_id)
            if req is not None and req.prompt_logprobs is not None:
                # position j predicts prompt token j + 1; known: positions < len(req.prompt_logprobs) - 1
                first = known.get(req.request_id, len(req.prompt_logprobs) - 1)
                last = min(seq.num_computed + n, seq.num_prompt - 1)
                if seq.num_computed <= first < last:
                    prompt_rows.append((req, first, last - first))
                    token_rows.extend(range(offset + first - seq.num_computed, offset + last - seq.num_computed))
                    known[req.request_id] = last
            offset += n
        return prompt_rows, token_rows

    def _prompt_logprobs(self, prompt_rows: list[tuple[Request, int, int]], logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids, top = [], []
        for req, first, count in prompt_rows:
            ids.extend(req.prompt_token_ids[first + 1 : first + 1 + count])
            top.extend([req.params.prompt_logprobs] * count)
        chosen, ranks, alts = token_logprobs(logp, torch.tensor(ids, dtype=torch.long, device=logp.device), top)
        j = 0
        for req, _, count in prompt_rows:
            req.prompt_logprobs.extend(make_logprobs(ids[i], chosen[i], ranks[i], alts[i], self._token_text)
                                       for i in range(j, j + count))
            j += count

    def _append(self, seq: Sequence, token: int, logprob: float, logprobs: dict | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprob
        reason, stop_reason = None, None
        may_stop = seq.num_outputs >= p.min_tokens  # stops (tokens, strings) wait for min_tokens
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif may_stop and p.stop_token_ids and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif seq.num_outputs >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        ids = seq.output_token_ids[:-1] if reason == "stop" else seq.output_token_ids
        text = self._detokenize(seq, ids, final=reason is not None) if self.tokenizer is not None else ""
        if p.stop and may_stop:
            hits = [(i, s) for s in p.stop if (i := text.find(s)) >= 0]
            if hits:
                cut, s = min(hits)
                text, reason, stop_reason = text[:cut], "stop", s
        if reason is not None:
            seq.text, seq.stop_reason = text, stop_reason
            self.scheduler.finish(seq, reason)
            return
        # while running, hold back what may still change: a possible stop prefix (an incomplete UTF-8 character is
        # not in `text` yet)
        hold = max((len(s) - 1 for s in p.stop), default=0) if p.stop else 0
        seq.text = text[: len(text) - hold] if hold else text

    def _detokenize(self, seq: Sequence, ids: list[int], final: bool) -> str:
        """The text of output tokens `ids`, decoding only the tokens since the last complete character (a window of
        a few tokens, as vLLM's incremental detokeniser: a whole-output decode per token would make a step's host
        work grow with the output). While running, a trailing incomplete UTF-8 character is left for the next token;
        `final` flushes it."""
        pre, read = seq.detok_prefix, seq.detok_read
        prefix_text = self.decode(ids[pre:read]) if read > pre else ""
        new_text = self.decode(ids[pre:])
        delta = new_text[len(prefix_text):]
        if final:
            return seq.detok_text + delta
        if delta and not delta.endswith("\ufffd"):
            seq.detok_text += delta
            seq.detok_prefix, seq.detok_read = read, len(ids)
        return seq.detok_text


class LLM:
    """Offline generation: `LLM(path).generate(prompts, SamplingParams(...))` -> one finished
    `RequestOutput` per prompt, in order."""

    def __init__(self, model: str | None = None, *, live_model=None, tokenizer=None, **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), model=live_model, tokenizer=tokenizer)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

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
