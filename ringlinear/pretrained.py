"""One way to get a model ready for use: `load_pretrained(source)` takes a preset name (random initial weights,
seeded) or a checkpoint directory in the HF layout, and returns the model with its tokenizer and end-of-sequence
/ padding ids. Every entry point (engine, trainer, RL, CLI, demo) builds its model through it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ringlinear.config import PRESETS, RingLinearConfig, preset
from ringlinear.model import RingLinearForCausalLM, init_model


@dataclass
class Pretrained:
    model: RingLinearForCausalLM
    tokenizer: Any | None  # a `tokenizers.Tokenizer`, or None (a checkpoint without tokenizer.json: token ids only)
    eos_token_ids: set[int]  # every id that ends a generation: config.json, generation_config.json, <|im_end|>
    pad_token_id: int | None

    @property
    def config(self) -> RingLinearConfig:
        return self.model.config

    @property
    def eos_token_id(self) -> int:
        """The id appended after each training document: config.json's (first) `eos_token_id`."""
        eos = self.config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos


def _ids(value) -> set[int]:
    return set() if value is None else set(value if isinstance(value, list) else [value])


def preset_with_tokenizer(name: str, overrides: dict | None = None, tokenizer: str | None = None,
                          byte_level_max_vocab: int | None = None):
    """(config, tokenizer or None) for a preset: the tokenizer of directory `tokenizer` when given, else the
    byte-level one when the vocabulary holds it (and is at most `byte_level_max_vocab`; its <|endoftext|> /
    <|pad|> become the config's eos / pad ids), else None (the real presets' tokenizers ship with their releases)."""
    from ringlinear.tokenizer import byte_level_tokenizer, load_tokenizer

    config = preset(name, **(overrides or {}))
    if tokenizer:
        return config, load_tokenizer(tokenizer)
    tok = byte_level_tokenizer()
    if config.vocab_size < tok.get_vocab_size() or (byte_level_max_vocab and config.vocab_size > byte_level_max_vocab):
        return config, None
    config = config.replace(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
    return config, tok


def load_pretrained(source: str, *, overrides: dict | None = None, tokenizer: str | None = None,
                    require_tokenizer: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = "float32", embedding_std: float | None = None,
                    progress: bool = False, model_loader=None, init_device: str | torch.device = "cpu") -> Pretrained:
    """`source`: a preset name (`overrides` applied, initial weights from `seed`, `embedding_std` for the input
    embeddings) or a checkpoint directory (its weights; `overrides` and `embedding_std` are refused there: the
    checkpoint brings its config). Tokenizer: directory `tokenizer`, else the checkpoint's own `tokenizer.json`,
    else the byte-level one for small presets; `require_tokenizer` makes its absence an error. Weights land on
    `device` in `dtype` (None: the checkpoint's own `torch_dtype`), routers fp32. `model_loader(source, device=,
    dtype=, progress=)` makes the model instead of `ringlinear.hf.load_model` / `init_model` (the engine's
    tensor-parallel slice, FP8 weights, random weights for benchmarks). A preset's initial weights are drawn on
    `init_device` (`init_weights`: the CPU gives the same weights on any machine, a GPU gives them far faster)."""
    from ringlinear.hf import load_model
    from ringlinear.tokenizer import load_tokenizer

    gen_eos: set[int] = set()
    if source in PRESETS:
        config, tok = preset_with_tokenizer(source, overrides, tokenizer)
        if model_loader is not None:
            model = model_loader(source, device=device, dtype=dtype, progress=progress)
        else:
            model = init_model(config, seed=seed, device=init_device, dtype="float32" if dtype is None else dtype,
                               embedding_std=embedding_std).to(device)
    elif os.path.isdir(source):
        if overrides or embedding_std is not None:
            raise ValueError(f"model {source!r} is a checkpoint: model_overrides / embedding_init_std apply to presets "
                             "only (edit the checkpoint's config.json instead)")
        model = (model_loader or load_model)(source, device=device, dtype=dtype, progress=progress)
        tok_dir = tokenizer or source
        tok = load_tokenizer(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None
        gen = os.path.join(source, "generation_config.json")
        if os.path.exists(gen):
            with open(gen) as f:
                gen_eos = _ids(json.load(f).get("eos_token_id"))
    else:
        raise ValueError(f"model {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                         "directory")
    if tok is None and require_tokenizer:
        raise ValueError(f"model {source!r} has no tokenizer: give a directory with tokenizer.json (`tokenizer`)")
    if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    eos = _ids(model.config.eos_token_id) | gen_eos
    if tok is not None and tok.token_to_id("<|im_end|>") is not None and _chat_template_ends_turns(source, tokenizer):
        eos.add(tok.token_to_id("<|im_end|>"))  # a chat template that ends turns with <|im_end|> ends generation there
    return Pretrained(model, tok, eos, model.config.pad_token_id)


def _chat_template_ends_turns(source: str, tokenizer: str | None) -> bool:
    from ringlinear.tokenizer import tokenizer_config

    directory = tokenizer or (source if os.path.isdir(source) else None)
    template = tokenizer_config(directory).get("chat_template") if directory else None
    return bool(template) and "<|im_end|>" in template
