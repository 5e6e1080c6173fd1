"""One way to build a model: presets (seeded, byte-level tokenizer where it fits) and checkpoints (their weights,
tokenizer and end-of-generation ids) through `load_pretrained`; the device module's decisions."""

import json

import pytest
import torch

from ringlinear.device import PEAK_BF16_FLOPS, cast_for_compute, compute_dtype, parse_dtype, peak_flops
from ringlinear.hf import save_model
from ringlinear.pretrained import load_pretrained
from ringlinear.tokenizer import tokenizer_files


def test_preset_and_checkpoint_give_the_same_model(tmp_path):
    a = load_pretrained("tiny", seed=3)
    b = load_pretrained("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.tokenizer is not None and a.eos_token_id == a.tokenizer.token_to_id("<|endoftext|>")
    save_model(a.model, str(tmp_path / "ck"), extra_files=tokenizer_files(a.tokenizer))
    (tmp_path / "ck" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}))
    c = load_pretrained(str(tmp_path / "ck"))
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values()))
    im_end = c.tokenizer.token_to_id("<|im_end|>")
    assert c.eos_token_ids == {a.eos_token_id, 7, im_end}  # config, generation_config, the chat template's turn end
    with pytest.raises(ValueError, match="presets only"):
        load_pretrained(str(tmp_path / "ck"), overrides={"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="neither a preset"):
        load_pretrained(str(tmp_path / "nothing"))
    assert load_pretrained("ring-mini-linear-2.0", require_tokenizer=False, dtype="bfloat16",
                           overrides={"num_hidden_layers": 1, "num_experts": 0, "vocab_size": 64,
                                      "first_k_dense_replace": 1}).tokenizer is None


def test_device_decisions():
    assert parse_dtype("bf16") == torch.bfloat16 and compute_dtype(torch.device("cpu")) == torch.float32
    assert compute_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    with pytest.raises(ValueError, match="not supported"):
        parse_dtype("int4")
    assert peak_flops(torch.device("cpu")) is None
    names = [k for k, _ in PEAK_BF16_FLOPS]
    assert names.index("H200") < names.index("H20") and names.index("H100 PCIe") < names.index("H100")
    m = load_pretrained("tiny").model
    cast_for_compute(m, torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if ".mlp.gate." in n)
    assert all(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if ".mlp.gate." not in n)
