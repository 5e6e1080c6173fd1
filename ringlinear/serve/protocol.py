"""The OpenAI API's shapes. A request body is checked field by field (type, finiteness, range, valid Unicode)
into a `CompletionRequest` or `ChatRequest`; every refusal is an `APIError` naming the field, the value and
what is allowed. Usage and stream events are written here; the responses' shapes are `responses`'."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ringlinear.engine.sequence import (
    LOGIT_BIAS_LIMIT,
    MAX_LOGPROBS,
    RequestError,
    RequestOutput,
    SamplingParams,
)

SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit seed, as vLLM's protocol accepts
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 1024, 1024  # checked on every step: kept small
MAX_LOGIT_BIAS = 1024  # entries of logit_bias: added to the logits on every step, so kept small
MAX_PROMPTS = 1024  # prompts in one completions request (fewer where the server admits fewer requests)
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


# Fields of the OpenAI API (and vLLM's extensions) this server does not implement: accepted only with their neutral
# value (or null), so that a client relying on them learns it at once.
_NEUTRAL = {
    "suffix": ('""', lambda v: v == ""),
    "use_beam_search": ("false", lambda v: v is False),
    "prompt_logprobs": ("null", lambda v: False),
    "tools": ("[]", lambda v: v == []),
    "functions": ("[]", lambda v: v == []),
    "tool_choice": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "function_call": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "response_format": ('{"type": "text"}', lambda v: v == {"type": "text"}),
}


def check_unsupported(body: dict, fields: dict = _NEUTRAL) -> None:
    for name, (neutral, ok) in fields.items():
        v = body.get(name)
        if v is not None and not ok(v):
            raise bad(name, f"is not supported by this server (only {neutral} is accepted), got {show(v)}")


@dataclass(frozen=True)
class Limits:
    """What request checks need to know about the served model and engine."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_n: int = 64  # choices of one prompt (the engine's max_num_seqs: they run in one batch)
    max_prompts: int = MAX_PROMPTS  # prompts of one completions request (each is an engine request)


@dataclass(frozen=True)
class Streaming:
    stream: bool
    include_usage: bool  # a final chunk with the usage of the whole request
    continuous_usage: bool  # every chunk carries the usage so far (vLLM's stream_options.continuous_usage_stats)


def check_model(body: dict, limits: Limits) -> None:
    model = get_str(body, "model", None)
    if model is not None and model != limits.model_name:
        raise APIError(404, f"model {show(model)} is not served here (this server serves "
                            f"{show(limits.model_name)})", "model")


def common_fields(body: dict, limits: Limits) -> tuple[Streaming, int]:
    """The fields both endpoints share that are not sampling parameters; returns (streaming, n)."""
    check_model(body, limits)
    get_str(body, "user", None)
    n = body.get("n")
    if n is not None and not (is_int(n) and 1 <= n <= limits.max_n):
        raise bad("n", f"must be an integer in [1, {limits.max_n}] (the choices of a prompt run together in one batch "
                       f"of at most max_num_seqs={limits.max_n} sequences), got {show(n)}")
    n = n or 1
    best_of = get_int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:  # best_of = n asks for n samples and returns them all: what n does
        raise bad("best_of", f"is not supported other than equal to n={n} (ranking extra samples is not "
                             f"implemented), got {show(best_of)}")
    check_unsupported(body)
    stream = get_bool(body, "stream", False)
    opts = get_object(body, "stream_options")
    if opts is None:
        return Streaming(stream, False, False), n
    if not stream:
        raise bad("stream_options", "is only allowed with stream=true")
    for key in ("include_usage", "continuous_usage_stats"):
        if opts.get(key) is not None and not isinstance(opts[key], bool):
            raise APIError(400, f"'stream_options.{key}' must be true or false, got {show(opts[key])}",
                           "stream_options")
    usage = bool(opts.get("include_usage"))
    return Streaming(stream, usage, usage and bool(opts.get("continuous_usage_stats"))), n


def get_logit_bias(body: dict, limits: Limits) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"<token id>": bias in [-100, 100]} -> {token id: bias}; empty gives None."""
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} entries \"<token id>\": bias, got "
                                f"{show(v)}")
    out = {}
    for key, bias in v.items():
        # JSON keys are strings: decimal ASCII digits only (no sign, space or other scripts' digits)
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < limits.vocab_size):
            raise bad("logit_bias", f"keys must be token ids in [0, {limits.vocab_size}) written as decimal strings, "
                                    f"got {show(key)}")
        if not (is_number(bias) and (isinstance(bias, int) or math.isfinite(bias))
                and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
            raise bad("logit_bias", f"values must be numbers in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], got "
                                    f"{show(bias)} for token {key}")
        out[int(key)] = float(bias)
    return out or None


def sampling_params(body: dict, limits: Limits, n: int, max_tokens: int, max_tokens_name: str,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters from the fields both endpoints share. `max_tokens` is this request's (for a chat
    request without one, an upper bound the engine lowers to what the context leaves); `logprobs`: None, or the
    number of alternatives per token."""
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
    min_tokens = get_int(body, "min_tokens", 0, 0)
    if min_tokens > max_tokens:
        raise bad("min_tokens", f"must be at most {max_tokens_name} ({max_tokens}), got {min_tokens}")
    try:
        return SamplingParams(
            n=n,
            temperature=get_number(body, "temperature", 1.0, 0.0, 100.0),
            top_p=get_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=get_int(body, "top_k", 0, -1),
            seed=get_int(body, "seed", None, *SEED_RANGE),
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=stop or None,
            stop_token_ids=stop_ids or None,
            ignore_eos=get_bool(body, "ignore_eos", False),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=get_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=get_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=get_number(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True),
            logit_bias=get_logit_bias(body, limits),
        )
    except RequestError as e:  # SamplingParams' own checks, should a field slip past the ones above
        raise APIError(400, str(e), max_tokens_name if e.field == "max_tokens" else e.field) from None


# ---- requests -------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # one engine request each; choice index = prompt index * n + choice
    params: SamplingParams
    streaming: Streaming
    echo: bool  # the prompt is prepended to each choice's text (and its logprobs to the choice's)
    logprobs: int | None  # None, or the alternatives per token


@dataclass
class ChatRequest:
    messages: list[dict]
    params: SamplingParams
    streaming: Streaming
    fill_max_tokens: bool  # no max_tokens given: generate up to the context's end
    template_kwargs: dict
    top_logprobs: int | None  # None: no logprobs; k: the chosen token's and the k most likely alternatives


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    streaming, n = common_fields(body, limits)
    prompts = completion_prompts(body.get("prompt"), limits)
    echo = get_bool(body, "echo", False)
    logprobs = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = get_int(body, "max_tokens", 16, 1, limits.max_model_len)
    # echo with logprobs reports the prompt's tokens too (as vLLM: prompt logprobs with as many alternatives)
    params = sampling_params(body, limits, n, max_tokens, "max_tokens", logprobs, logprobs if echo else None)
    return CompletionRequest(prompts, params, streaming, echo, logprobs)


def completion_prompts(prompt: Any, limits: Limits) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of those (several prompts). A string's length against the context
    is checked by the tokeniser (`serve.prompts`); a list of ids is checked here."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise bad("prompt", f"holds {len(prompt)} prompts, more than the {limits.max_prompts} one request may "
                                "hold")
        return [one_prompt(p, limits, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [one_prompt(prompt, limits, "prompt")]


def one_prompt(prompt: Any, limits: Limits, name: str) -> str | list[int]:
    def refuse(message: str) -> APIError:
        return APIError(400, f"'{name}' {message}", "prompt")

    if isinstance(prompt, str):
        if not prompt:
            raise refuse("is empty")
        if not valid_unicode(prompt):
            raise refuse("is not valid Unicode text (it holds a lone surrogate)")
        return prompt
    if isinstance(prompt, list) and prompt:
        if len(prompt) >= limits.max_model_len:  # before looking at each element: the list may be huge
            raise refuse(f"has {len(prompt)} token ids, which leaves no room to generate within "
                         f"max_model_len={limits.max_model_len}")
        if all(is_int(t) and 0 <= t < limits.vocab_size for t in prompt):
            return prompt
        raise refuse(f"must hold token ids in [0, {limits.vocab_size})")
    if isinstance(prompt, list):
        raise refuse("is empty")
    raise refuse(f"must be a string, a list of token ids, or a list of those, got {show(prompt)}")


_CHAT_NEUTRAL = {"echo": ("false", lambda v: v is False)}  # vLLM's chat echo (prepend the last message): not done


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs: passed to the template as variables (enable_thinking=...), valid Unicode throughout."""
    kwargs = get_object(body, "chat_template_kwargs") or {}
    for key in ("messages", "add_generation_prompt"):
        if key in kwargs:
            raise bad("chat_template_kwargs", f"may not set '{key}' (the server sets it)")
    if not all(valid_unicode(s) for s in _strings(kwargs)):
        raise bad("chat_template_kwargs", "holds a string that is not valid Unicode (a lone surrogate)")
    return kwargs


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    streaming, n = common_fields(body, limits)
    check_unsupported(body, _CHAT_NEUTRAL)
    messages = chat_messages(body.get("messages"))
    get_bool(body, "parallel_tool_calls", None)
    logprobs = get_bool(body, "logprobs", False)
    top_logprobs = get_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top_logprobs and not logprobs:
        raise bad("top_logprobs", "needs logprobs=true (it is the number of alternatives to each logprob)")
    kwargs = template_kwargs(body)
    # max_tokens is the older name of max_completion_tokens: both are checked, max_tokens wins when both are set
    max_tokens = get_int(body, "max_tokens", None, 1, limits.max_model_len)
    max_completion_tokens = get_int(body, "max_completion_tokens", None, 1, limits.max_model_len)
    name = "max_tokens" if max_tokens is not None else "max_completion_tokens"
    max_tokens = max_tokens if max_tokens is not None else max_completion_tokens
    k = (top_logprobs or 0) if logprobs else None
    # without max_tokens the engine sets it to what the context leaves after the prompt, and checks min_tokens then
    params = sampling_params(body, limits, n, limits.max_model_len - 1 if max_tokens is None else max_tokens, name, k)
    return ChatRequest(messages, params, streaming, max_tokens is None, kwargs, k)


@dataclass
class TokenizeRequest:
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    prompt: str | None
    messages: list[dict] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    template_kwargs: dict
    return_token_strs: bool


def parse_tokenize(body: dict, limits: Limits) -> TokenizeRequest:
    check_model(body, limits)
    prompt, messages = body.get("prompt"), body.get("messages")
    if prompt is None and messages is None:
        raise bad("prompt", "or 'messages' is required")
    if prompt is not None and messages is not None:
        raise bad("messages", "cannot come with 'prompt': send one of them")
    return_token_strs = get_bool(body, "return_token_strs", False)
    if prompt is not None:
        if not isinstance(prompt, str) or not valid_unicode(prompt):
            raise bad("prompt", f"must be a string of valid Unicode, got {show(prompt)}")
        return TokenizeRequest(prompt, None, get_bool(body, "add_special_tokens", True), False, {}, return_token_strs)
    check_unsupported(body, {"continue_final_message": ("false", lambda v: v is False),
                             "chat_template": ("null: the checkpoint's own template is used", lambda v: False),
                             "tools": ("[]", lambda v: v == [])})
    # as vLLM: the template writes the special tokens of a conversation, so none are added by default
    return TokenizeRequest(None, chat_messages(messages), get_bool(body, "add_special_tokens", False),
                           get_bool(body, "add_generation_prompt", True), template_kwargs(body), return_token_strs)


def parse_detokenize(body: dict, limits: Limits) -> list[int]:
    check_model(body, limits)
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(is_int(t) and 0 <= t < limits.vocab_size for t in tokens)):
        raise bad("tokens", f"must be a list of token ids in [0, {limits.vocab_size}), got {show(tokens)}")
    return tokens


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
