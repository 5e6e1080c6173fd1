"""The config base: types checked from annotations (NaN/inf refused), unknown fields named, JSON and `--set`
overrides, attribute docstrings as field docs; the CLI's flags derived from the config dataclasses."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from ringlinear.cli import build_parser, config_from_args
from ringlinear.config_base import ConfigBase, ConfigError, field_docs
from ringlinear.engine.engine_config import EngineConfig
from ringlinear.rl.rl_config import RLConfig
from ringlinear.study.study_config import StudyConfig
from ringlinear.train.train_config import TrainConfig


@dataclass
class Toy(ConfigBase):
    _where: ClassVar[str] = "toy config"

    steps: int = 3
    """How many steps."""
    lr: float = 0.1
    """The learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    names: list[str] = field(default_factory=list)
    cap: int | None = None

    def validate(self) -> None:
        super().validate()
        self.require(self.steps >= 1, "steps", "must be >= 1")


@pytest.mark.parametrize("kw,needle", [
    ({"steps": "3"}, "steps='3': must be an integer"),
    ({"steps": True}, "steps=True: must be an integer"),
    ({"steps": 0}, "steps=0: must be >= 1"),
    ({"lr": float("nan")}, "lr=nan: must be a finite number"),
    ({"lr": float("inf")}, "lr=inf: must be a finite number"),
    ({"lr": "abc"}, "lr='abc': must be a finite number"),
    ({"betas": 5}, "betas=5: must be a list of numbers"),
    ({"betas": [0.9]}, "betas=[0.9]: must be a list of 2 items"),
    ({"names": "corpus.txt"}, "names='corpus.txt': must be a list of strings"),
    ({"cap": 1.5}, "cap=1.5: must be an integer or null"),
])
def test_types_are_checked_and_the_field_is_named(kw, needle):
    with pytest.raises(ConfigError, match="toy config field " + needle.replace("[", r"\[").replace("]", r"\]")):
        Toy(**kw)


def test_dict_json_and_overrides(tmp_path):
    t = Toy.from_dict({"betas": [0.8, 0.9], "lr": 1})
    assert t.betas == (0.8, 0.9) and t.lr == 1
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stepz'\]"):
        Toy.from_dict({"stepz": 2})
    (tmp_path / "t.json").write_text(json.dumps({"steps": 7}))
    assert Toy.from_json(tmp_path / "t.json").steps == 7
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not a JSON file"):
        Toy.from_json(tmp_path / "bad.json")
    assert Toy().with_overrides(["steps=9", "names=[\"a\"]"]).to_dict()["names"] == ["a"]
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        Toy().with_overrides(["steps"])
    assert field_docs(Toy) == {"steps": "How many steps.", "lr": "The learning rate."}


@pytest.mark.parametrize("cls", [EngineConfig, TrainConfig, RLConfig, StudyConfig])
def test_every_component_config_documents_every_field(cls):
    docs = field_docs(cls)
    missing = [n for n in cls.field_names() if not docs.get(n)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_cli_flags_are_the_config_fields():
    p = build_parser()
    args = p.parse_args(["serve", "--model", "ckpt", "--max-num-seqs", "8", "--enforce-eager", "--dtype", "bf16",
                         "--max-model-len", "none"])
    cfg = config_from_args(EngineConfig, args)
    assert (cfg.model, cfg.max_num_seqs, cfg.enforce_eager, cfg.dtype, cfg.max_model_len) == ("ckpt", 8, True, "bf16",
                                                                                             None)
    serve_flags = {a.dest for a in p._subparsers._group_actions[0].choices["serve"]._actions}
    assert set(EngineConfig.field_names()) <= serve_flags
    args = p.parse_args(["train", "--set", "lr=0.5", "--lr", "0.25", "--betas", "0.8,0.9", "--data", "a.txt,b.txt"])
    cfg = config_from_args(TrainConfig, args, {"steps": 5, "lr": 0.1})
    assert (cfg.steps, cfg.lr, cfg.betas, cfg.data) == (5, 0.25, (0.8, 0.9), ["a.txt", "b.txt"])  # flag > --set > file
    args = p.parse_args(["study", "ratio", "--layers", "2", "--batch", "4", "--group-sizes", "1,0"])
    sc = config_from_args(StudyConfig, args)
    assert (sc.num_layers, sc.micro_batch, sc.group_sizes) == (2, 4, [1, 0])
