"""The `ringlinear` command: inspect configs and checkpoints (`info`), write random checkpoints (`init`), convert a
softmax-only checkpoint (`convert`), train (`train`), RL (`rl`), serve (`serve`), the demo (`demo`) and the
hybrid-ratio study (`study`). The flags of `train`, `rl`, `serve` and `study ratio` are the fields of their config
dataclasses (`--field-name`, help from each field's docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from ringlinear.config import PRESETS, ConfigError, RingLinearConfig, preset
from ringlinear.config_base import field_docs, field_types, parse_override

# ---- flags from config dataclasses --------------------------------------------------------------


def _nullable(parse):
    def f(text: str):
        return None if text.strip().lower() in ("none", "null") else parse(text)

    f.__name__ = getattr(parse, "__name__", "value")
    return f


def _list_of(item):
    def f(text: str):
        try:
            return [item(x) for x in text.split(",") if x.strip()]
        except ValueError:
            name = {int: "integers", float: "numbers"}.get(item, "values")
            raise argparse.ArgumentTypeError(f"expected comma-separated {name} (e.g. 4,8,16), got {text!r}") from None

    return f


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON value, got {text!r}") from None


def _flag_type(tp: Any):
    """argparse `type=` for a field annotation (None for booleans: they get --flag / --no-flag)."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        inner = [a for a in args if a is not type(None)]
        parse = _flag_type(inner[0]) if len(inner) == 1 else str
        return _nullable(parse) if parse is not None else None
    origin = typing.get_origin(tp) or tp
    if tp is bool:
        return None
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple):
        item = args[0] if args else str
        return _list_of(item if item in (int, float, str) else str)
    return _json_value


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                     aliases: dict[str, list[str]] | None = None, required: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` (`--field-name`, and `aliases`), help = the field's docstring. A flag
    not given leaves its field unset (argparse.SUPPRESS), so config files and `--set` keep their values."""
    docs, types_ = field_docs(cls), field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else json.dumps(default)
        help_text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")
        names = [f"--{f.name.replace('_', '-')}", *(aliases or {}).get(f.name, [])]
        kind = _flag_type(types_[f.name])
        if kind is None:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper(), required=f.name in required)


def config_from_args(cls: type, args: argparse.Namespace, base: dict | None = None):
    """`cls` from `base` (a config file's fields), then `--set FIELD=VALUE` items, then the explicit flags."""
    d = dict(base or {})
    d.update(dict(parse_override(item) for item in getattr(args, "set", None) or []))
    d.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    return cls.from_dict(d)


def _read_json(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    return d


# ---- model configs ------------------------------------------------------------------------------


def _model_config(args) -> RingLinearConfig:
    if bool(args.preset) == bool(args.model):
        raise SystemExit("give exactly one of --preset NAME or --model PATH")
    try:
        cfg = preset(args.preset) if args.preset else RingLinearConfig.load(args.model)
        return cfg.with_overrides(args.set)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_info(args) -> int:
    from ringlinear.accounting import human, human_bytes, model_stats, rank_memory

    cfg = _model_config(args)
    s = model_stats(cfg)
    try:
        gpu = rank_memory(cfg, args.tensor_parallel_size, args.quantization)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps({**s.as_dict(), "per_gpu": gpu.as_dict()}))
        return 0
    name = args.preset or args.model
    print(f"{name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads x {cfg.head_dim}, "
          f"layer_group_size {cfg.layer_group_size}")
    print(f"  experts {cfg.num_experts} (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups keep {cfg.topk_group}), "
          f"shared {cfg.num_shared_experts}, MTP modules {cfg.num_nextn_predict_layers}")
    print("  layer  attention  mlp")
    for i, (a, m) in enumerate(zip(s.layer_types, s.mlp_types)):
        print(f"  {i:5d}  {a:9s}  {m}")
    print(f"  total parameters            {human(s.total_params)} ({s.total_params:,})")
    print(f"  activated non-embedding     {human(s.active_params)} ({s.active_params:,}) per token")
    print(f"  embedding + lm_head         {human(s.embedding_params)};  MTP {human(s.mtp_params)}")
    print(f"  KV cache (bf16)             {human_bytes(s.kv_bytes_per_token)} per token "
          f"({s.layer_types.count('softmax')} softmax layers)")
    print(f"  linear-attention state      {human_bytes(s.state_bytes_per_sequence)} per sequence "
          f"({s.layer_types.count('linear')} linear layers, fp32)")
    weights = "FP8 projections and experts" if gpu.quantization else "bf16"
    print(f"  per GPU, tensor_parallel_size {gpu.tensor_parallel_size} ({weights}; what the engine holds):")
    print(f"    weights                   {human_bytes(gpu.weight_bytes)}")
    print(f"    KV cache (bf16)           {human_bytes(gpu.kv_bytes_per_token)} per token")
    print(f"    linear-attention state    {human_bytes(gpu.state_bytes_per_sequence)} per sequence")
    for ctx, seqs in ((32768, 8), (32768, 64), (131072, 16)):
        total = gpu.weight_bytes + seqs * (gpu.state_bytes_per_sequence + ctx * gpu.kv_bytes_per_token)
        print(f"    {seqs:3d} sequences x {ctx // 1024}K tokens: {human_bytes(total)} with the weights")
    return 0


def cmd_init(args) -> int:
    import torch

    from ringlinear.accounting import human, model_stats
    from ringlinear.hf import save_model
    from ringlinear.model import init_model
    from ringlinear.pretrained import preset_with_tokenizer
    from ringlinear.tokenizer import tokenizer_files

    if args.preset:
        try:
            over = dict(parse_override(item) for item in args.set or [])
            cfg, tok = preset_with_tokenizer(args.preset, over, byte_level_max_vocab=4096)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        cfg, tok = _model_config(args), None
    cfg = cfg.replace(torch_dtype={"bf16": "bfloat16", "fp32": "float32"}[args.dtype])
    stats = model_stats(cfg)
    if tok is not None:
        extra, tok_note = tokenizer_files(tok), f"byte-level tokenizer ({tok.get_vocab_size()} tokens)"
    else:
        extra = {}
        tok_note = ("no tokenizer: copy the official tokenizer files (tokenizer.json, tokenizer_config.json) of the "
                    "release into the directory")
    print(f"initialising {human(stats.total_params)} parameters ({args.dtype}, seed {args.seed}) ...", file=sys.stderr)
    model = init_model(cfg, seed=args.seed, device="cpu", dtype=cfg.torch_dtype)
    with torch.no_grad():
        save_model(model, args.out, max_shard_bytes=int(args.shard_gb * 1024**3), extra_files=extra)
    print(f"wrote {args.out}: config.json, safetensors shards, {tok_note}")
    return 0


def cmd_convert(args) -> int:
    from ringlinear.convert import convert_softmax_to_hybrid

    try:
        cfg = convert_softmax_to_hybrid(args.from_softmax, args.out, args.layer_group_size, args.group_norm_size)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {cfg.layer_types.count('linear')} linear + {cfg.layer_types.count('softmax')} softmax "
          f"layers (layer_group_size {cfg.layer_group_size}); continue training with `ringlinear train`")
    return 0


# ---- training, RL, serving --------------------------------------------------------------------


def _job_config(cls: type, args):
    """`cls` from `--config FILE`, `--set` items and flags; a bad value ends the command with its message."""
    try:
        return config_from_args(cls, args, _read_json(args.config))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_train(args) -> int:
    from ringlinear.train.state import TrainCheckpointError
    from ringlinear.train.train_config import TrainConfig
    from ringlinear.train.trainer import Trainer

    cfg = _job_config(TrainConfig, args)
    try:
        hist = Trainer(cfg).fit()
    except (OSError, ValueError, TrainCheckpointError) as e:  # bad config, data, checkpoint: the message names it
        raise SystemExit(f"error: {e}") from None
    if hist and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dict(hist[-1])))
    return 0


def cmd_rl(args) -> int:
    from ringlinear.rl.loop import RLRun
    from ringlinear.rl.rl_config import RLConfig

    cfg = _job_config(RLConfig, args)
    run = RLRun(cfg)
    hist = run.run()
    if hist:
        print(json.dumps({k: v for k, v in hist[-1].items() if k != "example"}))
    if run.evals:
        print(json.dumps({"eval_accuracy": [(e["step"], e["eval_accuracy"]) for e in run.evals]}))
    if cfg.out_dir:
        print(f"wrote {cfg.out_dir}/history.json" + (f", {cfg.out_dir}/reward.png" if cfg.plot else ""))
    return 0


def cmd_serve(args) -> int:
    from ringlinear.engine.engine_config import EngineConfig
    from ringlinear.serve import ServerConfig, serve

    try:
        engine_config = config_from_args(EngineConfig, args)
        server_config = config_from_args(ServerConfig, args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        serve(engine_config, server_config)
    except ImportError as e:
        raise SystemExit(f"error: serving needs the [serve] extra (pip install 'ringlinear[serve]'): {e}") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:
        if getattr(e, "fatal", False):  # the engine died while serving (a tensor-parallel rank exited)
            raise SystemExit(f"error: {e}") from None
        raise
    return 0


def cmd_demo(args) -> int:
    from ringlinear.demo import DEFAULT_PROMPTS, run_demo

    args.prompts = args.prompt or DEFAULT_PROMPTS
    args.model_overrides = dict(parse_override(item) for item in args.set or [])
    run_demo(args)
    return 0


def cmd_study_ratio(args) -> int:
    from ringlinear.demo import default_corpus, stdlib_corpus
    from ringlinear.study.ratio import run_study
    from ringlinear.study.study_config import StudyConfig

    try:
        sc = config_from_args(StudyConfig, args)
        os.makedirs(sc.out, exist_ok=True)
        if not sc.corpus:
            builtin = {"pydoc": default_corpus, "stdlib": stdlib_corpus}[args.builtin_corpus]
            sc = sc.replace(corpus=builtin(os.path.join(sc.out, f"corpus-{args.builtin_corpus}.txt")))
        run_study(sc)
    except ValueError as e:
        print(f"ringlinear study ratio: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_study_tool(args) -> int:
    from ringlinear.study import probe, seeds

    return {"seeds": seeds.main, "probe": probe.main}[args.study](args.rest)


# ---- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlinear", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--preset", choices=sorted(PRESETS), help="a named preset")
        sp.add_argument("--model", help="a checkpoint directory (config.json)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (JSON value)")

    sp = sub.add_parser("info", help="layer layout, parameter counts, cache and state sizes")
    model_args(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="size one GPU's part when the engine splits the model over N GPUs")
    sp.add_argument("--quantization", choices=["fp8"], default=None,
                    help="size FP8 weights (projections and experts e4m3, 128x128 block scales)")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("init", help="write a randomly initialised checkpoint in the official HF layout")
    model_args(sp)
    sp.add_argument("--out", required=True, help="output directory (replaced atomically)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    sp.add_argument("--shard-gb", type=float, default=4.0, help="largest shard size in GiB")
    sp.set_defaults(fn=cmd_init)

    from ringlinear.rl.rl_config import RLConfig
    from ringlinear.train.train_config import TrainConfig

    for name, cls, fn, text, aliases in (
            ("train", TrainConfig, cmd_train, "pre-train or fine-tune (BF16 or --fp8, FSDP2 under torchrun)", {}),
            ("rl", RLConfig, cmd_rl, "RL (GRPO/PPO) with engine rollouts and trainer updates aligned; reward curve",
             {"out_dir": ["--out"]})):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", help=f"JSON file of {cls.__name__} fields (flags and --set override it)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a field (JSON value)")
        add_config_flags(sp, cls, aliases=aliases)
        sp.set_defaults(fn=fn)

    from ringlinear.engine.engine_config import EngineConfig
    from ringlinear.serve.config import ServerConfig

    sp = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
                                      "/v1/chat/completions, /v1/models, /health)")
    add_config_flags(sp, EngineConfig, required=("model",))
    add_config_flags(sp, ServerConfig, aliases={"allowed_hosts": ["--allowed-host"],
                                                "cors_allow_origins": ["--cors-allow-origin"]})
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("convert", help="turn a softmax-only checkpoint into a Ring-linear hybrid")
    sp.add_argument("--from-softmax", required=True, metavar="CKPT", help="softmax-only checkpoint directory")
    sp.add_argument("--layer-group-size", type=int, required=True, metavar="M",
                    help="layers per group (M-1 linear + 1 softmax)")
    sp.add_argument("--group-norm-size", type=int, default=None, help="groups of the linear layers' output norm")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("demo", help="train a small hybrid on a corpus, serve it with the engine, report")
    sp.add_argument("--corpus", help="UTF-8 text file (default: CPython's pydoc help topics)")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a model config field")
    sp.add_argument("--steps", type=int, default=600)
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--lr", type=float, default=3e-3)
    sp.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-tokens", type=int, default=48)
    sp.add_argument("--prompt", action="append", help="a prompt to complete (repeatable)")
    sp.add_argument("--report-context", type=int, default=4096, help="context length for the cache comparison")
    sp.set_defaults(fn=cmd_demo)

    from ringlinear.study.study_config import StudyConfig

    sp = sub.add_parser("study", help="the hybrid-ratio study (`study ratio`) and its tools (`study seeds`, "
                                      "`study probe`)")
    st = sp.add_subparsers(dest="study", required=True)
    sr = st.add_parser("ratio", help="train models differing only in layer_group_size; table + plots (resumable)")
    sr.add_argument("--builtin-corpus", choices=["pydoc", "stdlib"], default="pydoc",
                    help="offline corpus when no --corpus: CPython's help topics (0.5 MB) or its stdlib sources (11 MB)")
    add_config_flags(sr, StudyConfig, aliases={"num_layers": ["--layers"], "micro_batch": ["--batch"]})
    sr.set_defaults(fn=cmd_study_ratio)
    for name, text in (("seeds", "combine finished study folders of the same settings (seeds): table, JSON, plot"),
                       ("probe", "recall-only MQAR probe of one study model")):
        tool = st.add_parser(name, help=text, add_help=False)
        tool.add_argument("rest", nargs=argparse.REMAINDER)
        tool.set_defaults(fn=cmd_study_tool)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
