"""Prompts to token ids, off the engine thread and the event loop: a small thread pool renders chat templates
and tokenises (with the GIL released, `LLMEngine.encode`), so a long prompt never stalls other requests' streams. A text whose UTF-8 size exceeds
max_model_len x the longest token's bytes cannot fit whatever it tokenises to, and is refused before tokenising;
the exact length check follows tokenising."""

from __future__ import annotations

import asyncio
import concurrent.futures

from ringlinear.engine.sequence import RequestError
from ringlinear.serve.protocol import APIError, TokenizeRequest


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the input bytes one token covers: the UTF-8 size of the longest vocabulary entry. (A
    byte-level vocabulary writes each byte as one character of at least one UTF-8 byte, so this over-counts,
    which keeps the bound safe; it assumes the tokenizer's normaliser does not delete text.)"""
    return max((len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


class PromptEncoder:
    """Tokenises requests' prompts in `threads` worker threads; errors are `APIError`s naming the field."""

    def __init__(self, engine, threads: int):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        tokenizer = engine.tokenizer
        self.max_prompt_bytes = None if tokenizer is None else self.max_model_len * longest_token_bytes(tokenizer)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ringlinear-tokenizer")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, field: str, name: str | None = None, generating: bool = True) -> list[int]:
        """Run `fn` in the pool; its ids must leave room to generate (`generating`) or at least fit the context.
        Refusals name `field` (`name`: how the message calls it, e.g. prompt[2])."""
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except RequestError as e:
            raise APIError(400, str(e), field) from None
        name = name or field
        if generating and len(ids) >= self.max_model_len:
            raise APIError(400, f"'{name}' is {len(ids)} tokens long, which leaves no room to generate within "
                                f"max_model_len={self.max_model_len}", field)
        if len(ids) > self.max_model_len:
            raise APIError(400, f"'{name}' is {len(ids)} tokens long, more than max_model_len={self.max_model_len}",
                           field)
        return ids

    def _check_size(self, text: str, name: str) -> None:
        bound = self.max_prompt_bytes
        # len() counts characters, each at least one byte: an O(1) test before encoding a huge string
        if bound is not None and (len(text) > bound or len(text.encode("utf-8")) > bound):
            raise APIError(400, f"'{name}' is too long: over {bound} bytes of UTF-8 cannot fit in "
                                f"max_model_len={self.max_model_len} tokens", "prompt")

    async def completion(self, prompt: str | list[int], name: str = "prompt") -> list[int]:
        """Token ids of a completion prompt (a string is tokenised with its special-token strings parsed, as vLLM
        does for completions; token ids pass as they are). `name`: the prompt's place in the request."""
        if not isinstance(prompt, str):
            return list(prompt)
        self._check_size(prompt, name)
        return await self._run(lambda: self.engine.encode(prompt), "prompt", name)

    async def completions(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt of a completions request."""
        if len(prompts) == 1:
            return [await self.completion(prompts[0])]
        return list(await asyncio.gather(*(self.completion(p, f"prompt[{i}]") for i, p in enumerate(prompts))))

    async def chat(self, messages: list[dict], template_kwargs: dict, add_generation_prompt: bool = True,
                   generating: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the chat template (user text never special)."""
        return await self._run(lambda: self.engine.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs,
            max_text_bytes=self.max_prompt_bytes), "messages", generating=generating)

    # ---- /tokenize, /detokenize ---------------------------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> list[int]:
        """vLLM's /tokenize: a prompt's ids (with the tokenizer's special tokens unless add_special_tokens is
        false), or a conversation's as the chat template renders it (the special tokens added when asked). It
        must fit max_model_len."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this server's checkpoint has no tokenizer", "prompt")
        if req.prompt is not None:
            self._check_size(req.prompt, "prompt")
            return await self._run(lambda: tokenizer.encode_batch([req.prompt], add_special_tokens=(
                req.add_special_tokens))[0].ids, "prompt", generating=False)
        ids = await self.chat(req.messages, req.template_kwargs, req.add_generation_prompt, generating=False)
        if req.add_special_tokens:
            before, after = special_token_frame(tokenizer)
            ids = before + ids + after
        return ids

    async def detokenize(self, ids: list[int]) -> str:
        """vLLM's /detokenize: the text of `ids`, special tokens written out."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this server's checkpoint has no tokenizer", "tokens")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: tokenizer.decode(ids, skip_special_tokens=False))

    def token_strs(self, ids: list[int]) -> list[str | None]:
        """The vocabulary entries of `ids` (vLLM's return_token_strs: the tokens as the vocabulary writes them)."""
        tokenizer = self.engine.tokenizer
        return [tokenizer.id_to_token(t) for t in ids]


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's post-processor puts before and after a text (e.g. [BOS], []): read off
    the encoding of one character with and without them."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
