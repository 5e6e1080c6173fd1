"""Chat templates, rendered as transformers renders them: jinja2's immutable sandbox (a checkpoint's template
cannot reach Python internals), trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`
and a `tojson` that does not escape HTML. `encode_chat` turns a conversation into token ids in which text
from the messages never becomes a special token: special-token strings inside the messages are swapped for
placeholders before rendering, and encoded as plain text after; the template's own special tokens stay special.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

# Unicode private-use code points around each placeholder; with a random nonce per render a user cannot type one
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"


class ChatTemplateError(ValueError):
    """The template cannot render these messages: it raised, failed, or tried an operation the sandbox refuses."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source text, in the sandbox transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True,
           variables: dict[str, Any] | None = None) -> str:
    """The template applied to `messages`; `variables` are further template variables (the special tokens such
    as bos_token, and request options such as enable_thinking). Raises `ChatTemplateError`."""
    template = compile_template(source)
    try:
        return template.render({**(variables or {}), "messages": messages,
                                "add_generation_prompt": add_generation_prompt})
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
    except Exception as e:  # a template's own bug on unusual input (e.g. a filter on a value of another type)
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def special_token_strings(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (the added tokens marked special), longest first."""
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return sorted(specials, key=lambda s: (-len(s), s))


class _Specials:
    """What `encode_chat` needs per tokenizer: its special-token strings, a pattern finding them, and a copy of
    the tokenizer that encodes them as ordinary text. A copy, because flipping `encode_special_tokens` on a
    tokenizer that other threads use would race."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.strings = special_token_strings(tokenizer)
        self.pattern = re.compile("|".join(re.escape(s) for s in self.strings)) if self.strings else None
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.encode_special_tokens = True


_specials_cache: dict[int, _Specials] = {}  # by id(tokenizer); the entry holds the tokenizer, so the id stays its


def _specials(tokenizer) -> _Specials:
    entry = _specials_cache.get(id(tokenizer))
    if entry is None or entry.tokenizer is not tokenizer:
        if len(_specials_cache) >= 4:
            _specials_cache.pop(next(iter(_specials_cache)), None)
        entry = _specials_cache[id(tokenizer)] = _Specials(tokenizer)
    return entry


class RenderedChat:
    """A rendered conversation: `pieces` alternate template text (special tokens in it are special) and the
    special-token strings found in user text (encoded as plain text)."""

    def __init__(self, tokenizer, plain, pieces: list[str]):
        self.tokenizer, self.plain, self.pieces = tokenizer, plain, pieces

    @property
    def num_bytes(self) -> int:
        """UTF-8 size of the rendered text."""
        return sum(len(p.encode("utf-8")) for p in self.pieces)

    def encode(self) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(self.pieces):
            if k % 2:
                ids += self.plain.encode(piece, add_special_tokens=False).ids
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids


def render_chat(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens_map: dict[str, str] | None = None, template_kwargs: dict | None = None) -> RenderedChat:
    """Render a conversation for tokenising (`.encode()`). Every string in `messages` and `template_kwargs` (request
    options such as enable_thinking) is user text: special-token strings in it are swapped for placeholders
    before rendering and encoded as plain text (the ids of their characters), so a user cannot close a turn or
    open another role's; the special tokens the template writes itself, and `special_tokens_map`'s (bos_token,
    eos_token, ...), stay special. Raises `ChatTemplateError`."""
    variables = {**(special_tokens_map or {})}
    sp = _specials(tokenizer)
    if sp.pattern is None:
        text = render(source, messages, add_generation_prompt, {**variables, **(template_kwargs or {})})
        return RenderedChat(tokenizer, sp.plain, [text])
    nonce = _OPEN + secrets.token_hex(8)
    index = {s: i for i, s in enumerate(sp.strings)}

    def escape(value):
        if isinstance(value, str):
            return sp.pattern.sub(lambda m: f"{nonce}{index[m.group()]}{_CLOSE}", value)
        if isinstance(value, list):
            return [escape(v) for v in value]
        if isinstance(value, dict):
            return {k: escape(v) for k, v in value.items()}
        return value

    text = render(source, escape(messages), add_generation_prompt, {**variables, **escape(template_kwargs or {})})
    # [template text, special index, template text, ...]
    pieces = re.split(re.escape(nonce) + r"(\d+)" + _CLOSE, text)
    pieces[1::2] = [sp.strings[int(k)] for k in pieces[1::2]]
    return RenderedChat(tokenizer, sp.plain, pieces)


def encode_chat(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens_map: dict[str, str] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation, user text never special (see `render_chat`)."""
    return render_chat(tokenizer, source, messages, add_generation_prompt, special_tokens_map,
                       template_kwargs).encode()
