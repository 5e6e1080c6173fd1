"""The OpenAI API's shapes. A request body is checked field by field (type, finiteness, range, valid Unicode)
into a `CompletionRequest` or `ChatRequest`; every refusal is an `APIError` naming the field, the value and
what is allowed. The responses, stream chunks, usage and logprobs are built here too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ringlinear.engine.sequence import CompletionOutput, RequestError, RequestOutput, SamplingParams

SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit seed, as vLLM's protocol accepts
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 1024, 1024  # checked on every step: kept small
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An OpenAI-style error response: HTTP `status`, `message`, the request field (`param`) it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def show(value: Any) -> str:
    """A short, printable rendering of a request value for error messages (lone surrogates escaped)."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, str) and len(value) > 60:
        value = value[:60] + "..."
    text = json.dumps(value)  # ASCII with escapes; NaN and Infinity spelled as the JSON extensions
    return text if len(text) <= 80 else text[:77] + "..."


# ---- field checks ---------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can carry
        return False
    return True


def bad(name: str, message: str) -> APIError:
    return APIError(400, f"'{name}' {message}", name)


def get_int(body: dict, name: str, default: Any, lo: int, hi: int | None = None) -> Any:
    """`body[name]` as an integer in [lo, hi]; absent or null gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        raise bad(name, f"must be {allowed}, got {show(v)}")
    return v


def get_number(body: dict, name: str, default: Any, lo: float, hi: float, lo_open: bool = False) -> Any:
    """`body[name]` as a finite number in [lo, hi] (or (lo, hi]); absent or null gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    finite = is_number(v) and (isinstance(v, int) or math.isfinite(v))  # an int is finite (and may not fit a float)
    if not finite or not (v > lo if lo_open else v >= lo) or v > hi:
        raise bad(name, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {show(v)}")
    return v


def get_bool(body: dict, name: str, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {show(v)}")
    return v


def get_str(body: dict, name: str, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str) or not valid_unicode(v):
        raise bad(name, f"must be a string of valid Unicode, got {show(v)}")
    return v


def get_object(body: dict, name: str) -> dict | None:
    v = body.get(name)
    if v is not None and not isinstance(v, dict):
        raise bad(name, f"must be an object, got {show(v)}")
    return v


# Fields of the OpenAI API this server does not implement: accepted only with their neutral value (or null).
_NEUTRAL = {
    "presence_penalty": ("0", lambda v: is_number(v) and v == 0),
    "frequency_penalty": ("0", lambda v: is_number(v) and v == 0),
    "repetition_penalty": ("1", lambda v: is_number(v) and v == 1),
    "logit_bias": ("{}", lambda v: v == {}),
    "best_of": ("1", lambda v: is_int(v) and v == 1),
    "suffix": ('""', lambda v: v == ""),
    "min_tokens": ("0", lambda v: is_int(v) and v == 0),
    "use_beam_search": ("false", lambda v: v is False),
    "tools": ("[]", lambda v: v == []),
    "functions": ("[]", lambda v: v == []),
    "tool_choice": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "function_call": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "response_format": ('{"type": "text"}', lambda v: v == {"type": "text"}),
}


def check_unsupported(body: dict) -> None:
    for name, (neutral, ok) in _NEUTRAL.items():
        v = body.get(name)
        if v is not None and not ok(v):
            raise bad(name, f"is not supported by this server (only {neutral} is accepted), got {show(v)}")


@dataclass(frozen=True)
class Limits:
    """What request checks need to know about the served model."""

    model_name: str
    max_model_len: int
    vocab_size: int


def common_fields(body: dict, limits: Limits) -> tuple[bool, bool]:
    """The fields both endpoints share that are not sampling parameters; returns (stream, include_usage)."""
    model = get_str(body, "model", None)
    if model is not None and model != limits.model_name:
        raise APIError(404, f"model {show(model)} is not served here (this server serves "
                            f"{show(limits.model_name)})", "model")
    get_str(body, "user", None)
    if get_int(body, "n", 1, 1) != 1:
        raise bad("n", f"must be 1 (one choice per request), got {show(body['n'])}")
    check_unsupported(body)
    stream = get_bool(body, "stream", False)
    opts = get_object(body, "stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("stream_options", "is only allowed with stream=true")
    for key in ("include_usage", "continuous_usage_stats"):
        if opts.get(key) is not None and not isinstance(opts[key], bool):
            raise APIError(400, f"'stream_options.{key}' must be true or false, got {show(opts[key])}",
                           "stream_options")
    return stream, bool(opts.get("include_usage"))


def sampling_params(body: dict, limits: Limits, max_tokens: int, max_tokens_name: str,
                    logprobs: bool) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and valid_unicode(s) for s in stop)):
        raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them (each at "
                          f"most {MAX_STOP_CHARS} characters), got {show(stop)}")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and len(stop_ids) <= MAX_STOP_TOKEN_IDS and all(
            is_int(t) and 0 <= t < limits.vocab_size for t in stop_ids)):
        raise bad("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                                    f"[0, {limits.vocab_size}), got {show(stop_ids)}")
    try:
        return SamplingParams(
            temperature=get_number(body, "temperature", 1.0, 0.0, 100.0),
            top_p=get_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=get_int(body, "top_k", 0, -1),
            seed=get_int(body, "seed", None, *SEED_RANGE),
            max_tokens=max_tokens,
            stop=stop or None,
            stop_token_ids=stop_ids or None,
            ignore_eos=get_bool(body, "ignore_eos", False),
            logprobs=0 if logprobs else None,
        )
    except RequestError as e:  # SamplingParams' own checks, should a field slip past the ones above
        raise APIError(400, str(e), max_tokens_name if e.field == "max_tokens" else e.field) from None


# ---- requests -------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest:
    messages: list[dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    fill_max_tokens: bool  # no max_tokens given: generate up to the context's end
    template_kwargs: dict


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    stream, include_usage = common_fields(body, limits)
    prompt = completion_prompt(body.get("prompt"), limits)
    if get_bool(body, "echo", False):
        raise bad("echo", "is not supported by this server (only false is accepted)")
    logprobs = get_int(body, "logprobs", None, 0, 20)
    max_tokens = get_int(body, "max_tokens", 16, 1, limits.max_model_len)
    params = sampling_params(body, limits, max_tokens, "max_tokens", logprobs is not None)
    return CompletionRequest(prompt, params, stream, include_usage)


def completion_prompt(prompt: Any, limits: Limits) -> str | list[int]:
    """A string, a list of token ids, or a one-element list of either. The string's length against the context
    is checked by the tokeniser (`serve.prompts`); a list of ids is checked here."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "is empty")
        if not valid_unicode(prompt):
            raise bad("prompt", "is not valid Unicode text (it holds a lone surrogate)")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise bad("prompt", "holds several prompts: batched prompts are not supported, send one per request")
    elif isinstance(prompt, list) and prompt:
        if len(prompt) >= limits.max_model_len:  # before looking at each element: the list may be huge
            raise bad("prompt", f"has {len(prompt)} token ids, which leaves no room to generate within "
                                f"max_model_len={limits.max_model_len}")
        if all(is_int(t) and 0 <= t < limits.vocab_size for t in prompt):
            return prompt
        raise bad("prompt", f"must hold token ids in [0, {limits.vocab_size})")
    elif isinstance(prompt, list):
        raise bad("prompt", "is empty")
    raise bad("prompt", f"must be a string, a list of token ids, or a list holding one of those, got {show(prompt)}")


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    stream, include_usage = common_fields(body, limits)
    messages = chat_messages(body.get("messages"))
    get_bool(body, "parallel_tool_calls", None)
    logprobs = get_bool(body, "logprobs", False)
    if get_int(body, "top_logprobs", 0, 0, 20) != 0:
        raise bad("top_logprobs", "is not supported (only 0): the chosen tokens' logprobs come with logprobs=true")
    kwargs = get_object(body, "chat_template_kwargs") or {}
    for key in ("messages", "add_generation_prompt"):
        if key in kwargs:
            raise bad("chat_template_kwargs", f"may not set '{key}' (the server sets it)")
    if not all(valid_unicode(s) for s in _strings(kwargs)):
        raise bad("chat_template_kwargs", "holds a string that is not valid Unicode (a lone surrogate)")
    # max_tokens is the older name of max_completion_tokens: both are checked, max_tokens wins when both are set
    max_tokens = get_int(body, "max_tokens", None, 1, limits.max_model_len)
    max_completion_tokens = get_int(body, "max_completion_tokens", None, 1, limits.max_model_len)
    name = "max_tokens" if max_tokens is not None else "max_completion_tokens"
    max_tokens = max_tokens if max_tokens is not None else max_completion_tokens
    params = sampling_params(body, limits, 1 if max_tokens is None else max_tokens, name, logprobs)
    return ChatRequest(messages, params, stream, include_usage, max_tokens is None, kwargs)


def _strings(value: Any):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


def chat_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{role, content: str | None, name?, tool_calls?, tool_call_id?}] (text parts joined).
    Content may be null or absent only where OpenAI allows it: an assistant message with tool_calls."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"must be a non-empty list of {{role, content}} objects, got {show(messages)}")
    out = []
    for i, m in enumerate(messages):
        def refuse(message: str, i: int = i) -> APIError:
            return APIError(400, f"messages[{i}]{message}", "messages")

        if not isinstance(m, dict):
            raise refuse(f" must be an object with 'role' and 'content', got {show(m)}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise refuse(f".role must be one of {', '.join(CHAT_ROLES)}, got {show(role)}")
        msg: dict[str, Any] = {"role": role}
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise refuse(".tool_calls is only allowed in assistant messages")
            msg["tool_calls"] = _tool_calls(tool_calls, refuse)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise refuse(".content: only parts of type text ({type: text, text: string}) are supported")
            content = "".join(p["text"] for p in content)
        if content is None and not msg.get("tool_calls"):
            raise refuse(f".content is required for a {role} message (null only in an assistant message with "
                         "tool_calls)")
        if content is not None and not isinstance(content, str):
            raise refuse(f".content must be a string or a list of text parts, got {show(content)}")
        msg["content"] = content
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise refuse(f".{key} must be a string, got {show(m[key])}")
                msg[key] = m[key]
        if role == "tool" and "tool_call_id" not in msg:
            raise refuse(".tool_call_id is required for a tool message")
        if not all(valid_unicode(s) for s in _strings(msg)):
            raise refuse(" holds text that is not valid Unicode (a lone surrogate)")
        out.append(msg)
    return out


def _tool_calls(calls: Any, refuse) -> list[dict]:
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("id"), str) and c.get("type", "function") == "function"
        and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments"), str) for c in calls)
    if not ok:
        raise refuse(".tool_calls must be a list of {id, type: function, function: {name, arguments: string}}")
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in calls]


# ---- responses ------------------------------------------------------------------------------------------
def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(out: RequestOutput) -> dict:
    """OpenAI usage; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    p, c = len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def chosen_logprobs(choice: CompletionOutput, first: int = 0) -> list[float]:
    """The logprobs of a choice's tokens from the `first`."""
    return [lp[t].logprob for t, lp in zip(choice.token_ids[first:], choice.logprobs[first:])]


class TokenText:
    """The text of single tokens, for logprobs (special tokens included)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(piece: TokenText, ids: list[int], logprobs: list[float], offset: int) -> tuple[dict, int]:
    """OpenAI completion logprobs of the chosen tokens (no alternatives: top_logprobs is null); text offsets
    count the tokens' own texts from `offset`. Returns it and the offset after the last token."""
    tokens = [piece(t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}, offset


def chat_logprobs(piece: TokenText, ids: list[int], logprobs: list[float]) -> dict:
    content = []
    for t, lp in zip(ids, logprobs):
        s = piece(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
    return {"content": content}
