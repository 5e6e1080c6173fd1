"""Tokenizer files in the Hugging Face layout (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`): a byte-level vocabulary (256 byte tokens + specials, no merges) for small
presets, a byte-level BPE trained on a corpus for the demo, and loading with the `tokenizers` library.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_level_tokenizer() -> Tokenizer:
    """256 byte tokens (ids 0-255, in byte order) followed by the special tokens (256...)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n in byte order.
    o = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if o in printable:
        return o
    others = [b for b in range(256) if b not in printable]
    return others[o - 256]


def train_bpe(files: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (specials first: ids 0..3) trained on text files."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    return tok


def tokenizer_files(tok: Tokenizer, eos: str = "<|endoftext|>", pad: str = "<|pad|>") -> dict[str, str]:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad, "bos_token": None,
           "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(cfg, indent=2),
        "special_tokens_map.json": json.dumps({"eos_token": eos, "pad_token": pad}, indent=2),
    }


def load_tokenizer(path: str) -> Tokenizer:
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{path}: no tokenizer.json (a real Ring-linear checkpoint ships it with the release)")
    return Tokenizer.from_file(f)


def tokenizer_config(path: str) -> dict:
    f = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(f):
        return {}
    with open(f) as fh:
        return json.load(fh)
