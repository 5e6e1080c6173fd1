"""Prompts to token ids, off the engine thread and the event loop: a small thread pool renders chat templates
and tokenises (with the GIL released, `LLMEngine.encode`), so a long prompt never stalls other requests' streams. A text whose UTF-8 size exceeds
max_model_len x the longest token's bytes cannot fit whatever it tokenises to, and is refused before tokenising;
the exact length check follows tokenising."""

from __future__ import annotations

import asyncio
import concurrent.futures

from ringlinear.engine.sequence import RequestError
from ringlinear.serve.protocol import APIError


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

    async def _run(self, fn, field: str) -> list[int]:
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except RequestError as e:
            raise APIError(400, str(e), field) from None
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"'{field}' is {len(ids)} tokens long, which leaves no room to generate within "
                                f"max_model_len={self.max_model_len}", field)
        return ids

    async def completion(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt (a string is tokenised with its special-token strings parsed, as vLLM
        does for completions; token ids pass as they are)."""
        if not isinstance(prompt, str):
            return list(prompt)
        bound = self.max_prompt_bytes
        # len() counts characters, each at least one byte: an O(1) test before encoding a huge string
        if bound is not None and (len(prompt) > bound or len(prompt.encode("utf-8")) > bound):
            raise APIError(400, f"'prompt' is too long: over {bound} bytes of UTF-8 cannot fit in "
                                f"max_model_len={self.max_model_len} tokens", "prompt")
        return await self._run(lambda: self.engine.encode(prompt), "prompt")

    async def chat(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        """Token ids of a conversation rendered by the chat template (user text never special)."""
        return await self._run(lambda: self.engine.apply_chat_template(
            messages, tokenize=True, template_kwargs=template_kwargs, max_text_bytes=self.max_prompt_bytes),
            "messages")
