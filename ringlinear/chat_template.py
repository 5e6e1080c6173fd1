"""Chat templates, rendered as transformers renders them: jinja2's immutable sandbox (a checkpoint's template
cannot reach Python internals), trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now`
and a `tojson` that does not escape HTML. `encode_chat` turns a conversation into token ids in which text
from the messages never becomes a control token (transformers' `sanitize_control_tokens`): control tokens in
user text are marked before rendering and encoded as plain text after; the template's own stay tokens.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

# Unicode private-use code points that wrap the control tokens found in user text (transformers uses the same)
_START, _END = "\U000f0000", "\U000f0001"


class ChatTemplateError(ValueError):
    """The template cannot render these messages: it raised, failed, or tried an operation the sandbox refuses."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` for templates: a constructor only, so the real type (and its attributes) stay out of reach."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` for templates: no underscore-prefixed attributes can be stored on it."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot store the attribute {name!r}")


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source text, in the sandbox transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True,
           variables: dict[str, Any] | None = None) -> str:
    """The template applied to `messages`; `variables` are further template variables (the special tokens such
    as bos_token, and request options such as enable_thinking). As in transformers, keys holding None are dropped
    from the messages (templates test for a missing key, and would print "None"), and `tools` and `documents`
    are None unless given. Raises `ChatTemplateError`."""
    template = compile_template(source)
    messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    try:
        return template.render({"tools": None, "documents": None, **(variables or {}), "messages": messages,
                                "add_generation_prompt": add_generation_prompt})
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
    except Exception as e:  # a template's own bug on unusual input (e.g. a filter on a value of another type)
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def control_tokens(tokenizer, source: str) -> list[str]:
    """The strings a user must not be able to write as tokens: the tokenizer's special tokens, and its other added
    tokens that the template writes itself (found in its literal text; whitespace tokens aside), longest first.
    This is transformers' rule for `sanitize_control_tokens`."""
    literal = _template_literal_text(source)
    found = {t.content for t in tokenizer.get_added_tokens_decoder().values()
             if t.special or (t.content in literal and not t.content.isspace())}
    return sorted(found, key=lambda s: (-len(s), s))


@functools.lru_cache(maxsize=16)
def _template_literal_text(source: str) -> str:
    """The template's raw text and string constants, joined by NULs so no search matches across two of them."""
    ast = compile_template(source).environment.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


class _Controls:
    """What `render_chat` needs per (tokenizer, template): the control tokens, a pattern finding them in user text,
    one splitting a rendering at the marked ones (and at lone markers), and a copy of the tokenizer that encodes
    every control token as plain text. A copy, because flipping `encode_special_tokens` on a tokenizer that other
    threads use would race."""

    def __init__(self, tokenizer, source: str):
        from tokenizers import AddedToken, Tokenizer

        self.tokenizer = tokenizer
        self.tokens = control_tokens(tokenizer, source)
        alternation = "|".join(re.escape(s) for s in self.tokens) or "(?!)"  # (?!) never matches
        self.find = re.compile(alternation)
        self.split = re.compile(f"{_START}({alternation}){_END}|[{_START}{_END}]")
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.add_special_tokens([AddedToken(t, special=True) for t in self.tokens])  # marks them special
        self.plain.encode_special_tokens = True  # ... and special tokens are split like any text
        self.newline = tokenizer.encode("\n", add_special_tokens=False).ids


_controls_cache: dict[tuple[int, str], _Controls] = {}  # by (id(tokenizer), template); entries hold the tokenizer


def _controls(tokenizer, source: str) -> _Controls:
    key = (id(tokenizer), source)
    entry = _controls_cache.get(key)
    if entry is None or entry.tokenizer is not tokenizer:
        if len(_controls_cache) >= 8:
            _controls_cache.pop(next(iter(_controls_cache)), None)
        entry = _controls_cache[key] = _Controls(tokenizer, source)
    return entry


class RenderedChat:
    """A rendered conversation as `pieces`: [template text, user control token as text (or None for a lone
    marker), template text, ...]."""

    def __init__(self, controls: _Controls, pieces: list[str | None]):
        self.controls, self.pieces = controls, pieces

    @property
    def num_bytes(self) -> int:
        """UTF-8 size of the rendered text."""
        return sum(len(p.encode("utf-8")) for p in self.pieces if p)

    def encode(self) -> list[int]:
        c = self.controls
        ids = _ids(c.tokenizer, self.pieces[0])
        for k, piece in enumerate(self.pieces[1:], start=1):
            if not piece:
                continue
            as_text = k % 2 == 1
            piece_ids = self._encode_piece(c.plain if as_text else c.tokenizer, piece)
            if as_text and c.tokenizer.token_to_id(piece) in piece_ids:
                raise ChatTemplateError(f"{piece!r} in a message cannot be kept from becoming a control token: the "
                                        "tokenizer makes it from plain text")
            ids += piece_ids
        return ids

    def _encode_piece(self, tokenizer, piece: str) -> list[int]:
        # after a newline, so that a SentencePiece tokenizer adds no prefix space in mid-text; the newline is
        # removed again (transformers' way)
        ids = _ids(tokenizer, "\n" + piece)
        nl = self.controls.newline
        if ids[: len(nl)] == nl:
            return ids[len(nl):]
        return _ids(tokenizer, piece)


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added. encode_batch, unlike encode, releases the GIL while it works,
    so a long conversation does not stall the threads that serve other requests."""
    return tokenizer.encode_batch([text], add_special_tokens=False)[0].ids


def render_chat(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens_map: dict[str, str] | None = None, template_kwargs: dict | None = None) -> RenderedChat:
    """Render a conversation for tokenising (`.encode()`), transformers' `sanitize_control_tokens` way. Every
    string in `messages` and `template_kwargs` (request options such as enable_thinking) is user text: control
    tokens in it are wrapped in private-use markers before rendering (markers the user typed are dropped first)
    and encoded as plain text after, so a user cannot close a turn or open another role's; the control tokens the
    template writes itself, and `special_tokens_map`'s (bos_token, eos_token, ...), stay tokens. A template that
    splits user text between the markers leaves lone markers, which are dropped but still cut the text there.
    Raises `ChatTemplateError`."""
    controls = _controls(tokenizer, source)

    def mark(value):
        if isinstance(value, str):
            value = value.replace(_START, "").replace(_END, "")
            return controls.find.sub(lambda m: f"{_START}{m.group()}{_END}", value)
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        return value

    text = render(source, mark(messages), add_generation_prompt, {**(special_tokens_map or {}),
                                                                  **mark(template_kwargs or {})})
    return RenderedChat(controls, controls.split.split(text))


def encode_chat(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens_map: dict[str, str] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation, user text never control tokens (see `render_chat`)."""
    return render_chat(tokenizer, source, messages, add_generation_prompt, special_tokens_map,
                       template_kwargs).encode()
