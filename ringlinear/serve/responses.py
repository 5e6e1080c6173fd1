"""OpenAI response shapes from the engine's outputs. One HTTP request holds one engine request per prompt, each
with `n` choices: choice index = prompt index x n + choice (as OpenAI and vLLM). Logprobs in the completions
shape (tokens, token_logprobs, top_logprobs: chosen + k alternatives by text, text_offset) and the chat shape
(token, logprob, bytes, top_logprobs: the k most likely); usage summed over prompts and choices; per-choice
stream state, so each choice's deltas, logprobs and finish reason are sent once."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import decoders

from ringlinear.engine.sequence import CompletionOutput, Logprob, RequestOutput
from ringlinear.serve.protocol import usage

LOGPROB_FLOOR = -9999.0  # as vLLM: a -inf logprob (a token the model rules out) is not a JSON number


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character a byte-level vocabulary writes for each byte -> the
    byte. Printable bytes stand for themselves, the others for 256 + n in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenText:
    """The text of single tokens (special tokens included) and their bytes, for logprobs. A byte-level BPE
    token's bytes come from its vocabulary entry, so a character split over several tokens is reported as the
    bytes each token holds (OpenAI's `bytes`), where its text shows U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, list[int]] = {}
        self._byte_level = tokenizer is not None and isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._added = set(tokenizer.get_added_tokens_decoder()) if tokenizer is not None else set()
        self._alphabet = _byte_decoder() if self._byte_level else {}

    def text(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:  # the engine's cached decoding
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def bytes(self, token_id: int, text: str) -> list[int]:
        """The token's bytes; `text` is its text (used where the vocabulary does not say more)."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        out = None
        if self._byte_level and token_id not in self._added:
            entry = self.tokenizer.id_to_token(token_id)
            if entry is not None and all(ch in self._alphabet for ch in entry):
                out = [self._alphabet[ch] for ch in entry]
        if out is None:
            out = list(text.encode("utf-8"))
        if len(self._bytes) < 1 << 20:  # the vocabulary bounds it; the check keeps a stray caller from growing it
            self._bytes[token_id] = out
        return out


def completion_logprobs(piece: TokenText, ids: list[int], logprobs: list[dict[int, Logprob] | None],
                        offset: int) -> tuple[dict, int]:
    """OpenAI's completions logprobs of `ids`: each token's text, its logprob (null for a prompt's first token,
    which nothing predicts), `top_logprobs`: {text: logprob} of the chosen token and the asked alternatives (up
    to k + 1 entries, as OpenAI), and text offsets counting the tokens' texts from `offset`. Returns it and the
    offset after the last token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for t, d in zip(ids, logprobs):
        chosen = d.get(t) if d is not None else None
        text = piece.text(t, chosen)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if chosen is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_floor(chosen.logprob))
        alts: dict[str, float] = {}
        for a, lp in d.items():  # the chosen token first, then by rank: on equal texts the first is kept
            alts.setdefault(piece.text(a, lp), _floor(lp.logprob))
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


def chat_logprobs(piece: TokenText, ids: list[int], logprobs: list[dict[int, Logprob]], k: int) -> list[dict]:
    """OpenAI's chat logprobs content of `ids`: token, logprob, bytes, and the `k` most likely tokens (by rank,
    the chosen one among them when it ranks within k)."""
    content = []
    for t, d in zip(ids, logprobs):
        chosen = d[t]
        text = piece.text(t, chosen)
        ranked = sorted(((a, lp) for a, lp in d.items() if lp.rank is not None and lp.rank <= k),
                        key=lambda x: (x[1].rank, -x[1].logprob))[:k]
        alts = []
        for a, lp in ranked:
            a_text = piece.text(a, lp)
            alts.append({"token": a_text, "logprob": _floor(lp.logprob), "bytes": piece.bytes(a, a_text)})
        content.append({"token": text, "logprob": _floor(chosen.logprob), "bytes": piece.bytes(t, text),
                        "top_logprobs": alts})
    return content


def _add(a: dict, b: dict) -> dict:
    """Numbers added key by key, nested objects too (a key missing on one side keeps the other's value)."""
    out = dict(a)
    for key, v in b.items():
        w = out.get(key)
        if isinstance(v, dict) and isinstance(w, dict):
            out[key] = _add(w, v)
        elif isinstance(v, (int, float)) and isinstance(w, (int, float)):
            out[key] = w + v
        elif w is None:
            out[key] = v
    return out


def total_usage(outputs: list[RequestOutput | None]) -> dict:
    """Usage of one HTTP request: each prompt's (`protocol.usage`: its prompt once, its choices' tokens) added."""
    total: dict = {}
    for out in outputs:
        if out is not None:
            total = _add(total, usage(out))
    return total or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


# ---- choices ----------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One prompt of an HTTP request: its engine request and, for echo, its text."""

    request_id: str
    echo_text: str | None = None  # the prompt as text, prepended to its choices' text (completions' echo)


@dataclass
class _Sent:
    """What a stream has sent of one choice."""

    chars: int = 0  # of the choice's generated text
    tokens: int = 0  # of its generated tokens
    offset: int = 0  # text_offset of the next token (completions logprobs)
    started: bool = False  # the echo (completions) or the role (chat) is out
    finished: bool = False


@dataclass
class Choices:
    """The choices of one HTTP request over its prompts' engine requests (latest cumulative output of each)."""

    prompts: list[Prompt]
    n: int
    latest: list[RequestOutput | None] = field(default_factory=list)
    _sent: dict[int, _Sent] = field(default_factory=dict)

    def __post_init__(self):
        self.latest = [None] * len(self.prompts)
        self._index = {p.request_id: i for i, p in enumerate(self.prompts)}

    def update(self, out: RequestOutput) -> int:
        """Record a new output; returns its prompt's index."""
        i = self._index[out.request_id]
        self.latest[i] = out
        return i

    @property
    def finished(self) -> bool:
        return all(o is not None and o.finished for o in self.latest)

    def unfinished(self) -> list[str]:
        return [p.request_id for p, o in zip(self.prompts, self.latest) if o is None or not o.finished]

    def error(self) -> str | None:
        """The first error of a choice (the engine failed it alone; the HTTP request fails as a whole)."""
        return next((o.error for o in self.latest if o is not None and o.error is not None), None)

    def usage(self) -> dict:
        return total_usage(self.latest)

    def each(self) -> list[tuple[int, int, CompletionOutput]]:
        """(choice index, prompt index, output) of every choice, in index order (all outputs are finished)."""
        return sorted(((i * self.n + c.index, i, c) for i, o in enumerate(self.latest) for c in o.outputs),
                      key=lambda x: x[0])

    def sent(self, index: int) -> _Sent:
        return self._sent.setdefault(index, _Sent())


def _echo(out: RequestOutput, text: str, logprobs: bool) -> tuple[str, list[int], list]:
    """A prompt's echo: its text, its token ids, and their logprobs (None for the first, when asked)."""
    ids = list(out.prompt_token_ids)
    if not logprobs:
        return text, ids, []
    lps = out.prompt_logprobs
    if lps is None or len(lps) != len(ids):
        raise RuntimeError(f"the engine reported {0 if lps is None else len(lps)} prompt logprobs for a prompt of "
                           f"{len(ids)} tokens")
    return text, ids, list(lps)


def completion_choice(piece: TokenText, choices: Choices, index: int, i: int, c: CompletionOutput,
                      echo: bool, logprobs: bool) -> dict:
    """One finished choice of a completions response."""
    text, ids, lps = c.text, list(c.token_ids), list(c.logprobs or [])
    if echo:
        p_text, p_ids, p_lps = _echo(choices.latest[i], choices.prompts[i].echo_text, logprobs)
        text, ids, lps = p_text + text, p_ids + ids, p_lps + lps
    lp = completion_logprobs(piece, ids, lps, 0)[0] if logprobs else None
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def completion_deltas(piece: TokenText, choices: Choices, i: int, echo: bool, logprobs: bool) -> list[dict]:
    """The stream choices that prompt `i`'s latest output brings: per choice with new text, new tokens (when
    logprobs are asked) or a finish; the echo comes with a choice's first."""
    out, events = choices.latest[i], []
    for c in out.outputs:
        index = i * choices.n + c.index
        s = choices.sent(index)
        text, ids = c.text[s.chars:], c.token_ids[s.tokens:]
        lps = list(c.logprobs[s.tokens:]) if logprobs and c.logprobs is not None else []
        finish = c.finish_reason if c.finish_reason is not None and not s.finished else None
        if not s.started and echo:
            p_text, p_ids, p_lps = _echo(out, choices.prompts[i].echo_text, logprobs)
            text, ids, lps = p_text + text, p_ids + list(ids), p_lps + lps
        if not (text or finish or (logprobs and ids)):
            continue
        lp = None
        if logprobs:
            lp, s.offset = completion_logprobs(piece, ids, lps, s.offset)
        s.chars, s.tokens, s.started, s.finished = len(c.text), len(c.token_ids), True, finish is not None
        events.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish,
                       "stop_reason": c.stop_reason if finish else None})
    return events


def chat_choice(piece: TokenText, index: int, c: CompletionOutput, top_logprobs: int | None) -> dict:
    """One finished choice of a chat response."""
    lp = None if top_logprobs is None else {"content": chat_logprobs(piece, c.token_ids, c.logprobs, top_logprobs)}
    return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def chat_deltas(piece: TokenText, choices: Choices, top_logprobs: int | None) -> list[dict]:
    """The stream choices the latest output brings: first each choice's role, then per choice its new content,
    new tokens' logprobs (when asked) or its finish."""
    out, events = choices.latest[0], []
    for index in range(choices.n):
        s = choices.sent(index)
        if not s.started:
            s.started = True
            events.append({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None})
    for c in out.outputs:
        s = choices.sent(c.index)
        text, ids = c.text[s.chars:], c.token_ids[s.tokens:]
        finish = c.finish_reason if c.finish_reason is not None and not s.finished else None
        if not (text or finish or (top_logprobs is not None and ids)):
            continue
        lp = None
        if top_logprobs is not None:
            lp = {"content": chat_logprobs(piece, ids, c.logprobs[s.tokens:], top_logprobs)}
        s.chars, s.tokens, s.finished = len(c.text), len(c.token_ids), finish is not None
        events.append({"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp,
                       "finish_reason": finish, "stop_reason": c.stop_reason if finish else None})
    return events
