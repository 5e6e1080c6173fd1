"""The `ringlinear` command: inspect configs and checkpoints, write random checkpoints, and (as they
land) serve, train and run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ringlinear.config import PRESETS, ConfigError, RingLinearConfig, preset


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _config(args) -> RingLinearConfig:
    if bool(args.preset) == bool(args.model):
        raise SystemExit("give exactly one of --preset NAME or --model PATH")
    try:
        cfg = preset(args.preset) if args.preset else RingLinearConfig.load(args.model)
        over = _overrides(args.set)
        return cfg.replace(**over) if over else cfg
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except TypeError as e:
        raise SystemExit(f"error: unknown config field in --set ({e})") from None


def cmd_info(args) -> int:
    from ringlinear.accounting import human, human_bytes, model_stats

    cfg = _config(args)
    s = model_stats(cfg)
    if args.json:
        print(json.dumps(s.as_dict()))
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
    return 0


def cmd_init(args) -> int:
    import torch

    from ringlinear.accounting import human, model_stats
    from ringlinear.checkpoint import init_model, save_model
    from ringlinear.tokenizer import byte_level_tokenizer, tokenizer_files

    cfg = _config(args)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    cfg = cfg.replace(torch_dtype=dtype)
    stats = model_stats(cfg)
    tok = byte_level_tokenizer()
    if tok.get_vocab_size() <= cfg.vocab_size <= 4096:
        # Small presets get a byte-level vocabulary (the embedding rows past it stay unused).
        cfg = cfg.replace(eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
        extra = tokenizer_files(tok)
        tok_note = f"byte-level tokenizer ({tok.get_vocab_size()} tokens)"
    else:
        extra = {}
        tok_note = ("no tokenizer: copy the official tokenizer files (tokenizer.json, tokenizer_config.json) of the "
                    "release into the directory")
    print(f"initialising {human(stats.total_params)} parameters ({args.dtype}, seed {args.seed}) ...", file=sys.stderr)
    model = init_model(cfg, seed=args.seed, device="cpu", dtype=dtype)
    with torch.no_grad():
        save_model(model, args.out, max_shard_bytes=int(args.shard_gb * 1024**3), extra_files=extra)
    print(f"wrote {args.out}: config.json, safetensors shards, {tok_note}")
    return 0


def cmd_train(args) -> int:
    from ringlinear.train.trainer import TrainConfig, Trainer

    try:
        cfg = TrainConfig.from_json(args.config)
        over = _overrides(args.set)
        if over:
            cfg = TrainConfig.from_dict({**cfg.__dict__, **over})
        if args.resume:
            cfg = TrainConfig.from_dict({**cfg.__dict__, "resume": True})
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    hist = Trainer(cfg).fit()
    if hist and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in hist[-1].items()}))
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


def cmd_demo(args) -> int:
    from ringlinear.demo import DEFAULT_PROMPTS, run_demo

    args.prompts = args.prompt or DEFAULT_PROMPTS
    args.model_overrides = _overrides(args.set)
    run_demo(args)
    return 0


def cmd_study_ratio(args) -> int:
    from ringlinear.demo import default_corpus, stdlib_corpus
    from ringlinear.study.ratio import StudyConfig, run_study

    os.makedirs(args.out, exist_ok=True)
    builtin = {"pydoc": default_corpus, "stdlib": stdlib_corpus}[args.builtin_corpus]
    corpus = args.corpus or builtin(os.path.join(args.out, f"corpus-{args.builtin_corpus}.txt"))
    sc = StudyConfig(corpus=corpus, out=args.out, group_sizes=args.group_sizes, widths=args.widths,
                     num_layers=args.layers, steps=args.steps, micro_batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                     recall_keys=args.recall_keys, recall_values=args.recall_values, head_dim=args.head_dim,
                     heads=args.heads, recall_pairs=args.recall_pairs, recall_queries=args.recall_queries,
                     recall_eval_pairs=args.recall_eval_pairs,
                     recall_fraction=args.recall_fraction, seed=args.seed, save_every=args.save_every, jobs=args.jobs,
                     init_std=args.init_std, embedding_init_std=args.embedding_init_std, recall_loss=args.recall_loss,
                     eval_every=args.eval_every, compute_dtype=args.compute_dtype)
    try:
        run_study(sc)
    except ValueError as e:
        print(f"ringlinear study ratio: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args) -> int:
    from ringlinear.engine.llm import EngineConfig
    from ringlinear.serve import ServerConfig, serve

    try:
        engine_config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                     max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                     gpu_memory_utilization=args.gpu_memory_utilization)
        server_config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                                     served_model_name=args.served_model_name, allowed_hosts=args.allowed_host,
                                     cors_allow_origins=args.cors_allow_origin or [])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        serve(engine_config, server_config)
    except ImportError as e:
        raise SystemExit(f"error: serving needs the [serve] extra (pip install 'ringlinear[serve]'): {e}") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlinear", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--preset", choices=sorted(PRESETS), help="a named preset")
        sp.add_argument("--model", help="a checkpoint directory (config.json)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")

    sp = sub.add_parser("info", help="layer layout, parameter counts, cache and state sizes")
    model_args(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("init", help="write a randomly initialised checkpoint in the official HF layout")
    model_args(sp)
    sp.add_argument("--out", required=True, help="output directory (replaced atomically)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    sp.add_argument("--shard-gb", type=float, default=4.0, help="largest shard size in GiB")
    sp.set_defaults(fn=cmd_init)

    sp = sub.add_parser("train", help="pre-train (BF16 or --fp8, FSDP2 under torchrun) from a JSON train config")
    sp.add_argument("--config", required=True, help="JSON train config (fields of ringlinear.train.trainer.TrainConfig)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in save_dir")
    sp.add_argument("--fp8", dest="set", action="append_const", const="fp8=true", help="FP8 recipe (CUDA only)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a train config field")
    sp.set_defaults(fn=cmd_train)

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

    sp = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
                                      "/v1/chat/completions)")
    sp.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    sp.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    sp.add_argument("--max-model-len", type=int, default=None, help="prompt + generated tokens per request")
    sp.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched together")
    sp.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="fraction of GPU memory for weights + cache")
    sp.add_argument("--served-model-name", default=None, help="the model name clients use (default: the directory's)")
    sp.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    sp.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                    help="a Host header name to answer (repeatable; '*': any); default: loopback names when "
                         "--host is a loopback address, else any")
    sp.add_argument("--cors-allow-origin", action="append", default=None, metavar="ORIGIN",
                    help="a web origin allowed to call the API from a browser (repeatable; default: none)")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("study", help="studies: `study ratio` (hybrid ratio: loss, recall, cost)")
    st = sp.add_subparsers(dest="study", required=True)
    sr = st.add_parser("ratio", help="train models differing only in layer_group_size; table + plots (resumable)")
    def ints(s: str) -> list[int]:
        try:
            return [int(x) for x in s.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 4,8,16), got {s!r}") from None
    sr.add_argument("--corpus", help="UTF-8 text file (default: --builtin-corpus)")
    sr.add_argument("--builtin-corpus", choices=["pydoc", "stdlib"], default="pydoc",
                    help="offline corpus when no --corpus: CPython's help topics (0.5 MB) or its stdlib sources (11 MB)")
    sr.add_argument("--out", default="runs/ratio-study")
    sr.add_argument("--group-sizes", type=ints, default=[1, 2, 4, 8, 0],
                    help="comma-separated layer_group_size values (1 = all softmax, 0 = all linear)")
    sr.add_argument("--widths", type=ints, default=[64, 128])
    sr.add_argument("--layers", type=int, default=8)
    sr.add_argument("--steps", type=int, default=150)
    sr.add_argument("--batch", type=int, default=8)
    sr.add_argument("--seq-len", type=int, default=256)
    sr.add_argument("--lr", type=float, default=3e-3)
    sr.add_argument("--recall-keys", type=int, default=32, help="distinct keys of the recall task")
    sr.add_argument("--head-dim", type=int, default=32,
                    help="per-head q/k/v width: smaller leaves linear layers less state")
    sr.add_argument("--eval-every", type=int, default=0,
                    help="measure recall every N steps (the recall-vs-step curve in the JSON and plot); 0: at the end")
    sr.add_argument("--heads", type=int, default=0,
                    help="query heads per layer (0: width/32, at least 2; KV heads are half); more heads give the "
                         "linear layers faster-decaying heads")
    sr.add_argument("--recall-values", type=int, default=0, help="distinct values (0: as many as keys)")
    sr.add_argument("--recall-pairs", type=ints, default=[4, 8, 16, 32],
                    help="key-value pairs per recall sequence, trained on and evaluated at (context = 2P + 2Q)")
    sr.add_argument("--recall-eval-pairs", type=ints, default=[],
                    help="pair counts only evaluated, never trained on (more pairs than training showed)")
    sr.add_argument("--recall-queries", type=int, default=8, help="queries Q per recall sequence")
    sr.add_argument("--recall-fraction", type=float, default=0.4, help="share of training tokens in recall sequences")
    sr.add_argument("--recall-loss", choices=["answers", "all"], default="answers",
                    help="train recall sequences on their answers only (as MQAR) or on every next token")
    sr.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="training compute dtype (fp32 by default on every device: see StudyConfig)")
    sr.add_argument("--init-std", type=float, default=0.0,
                    help="std of projection weights at init; 0: sqrt(2 / (5 * width)) (see StudyConfig)")
    sr.add_argument("--embedding-init-std", type=float, default=1.0, help="std of the input embeddings at init")
    sr.add_argument("--seed", type=int, default=0)
    sr.add_argument("--save-every", type=int, default=0, help="checkpoint each run every N steps to resume mid-run")
    sr.add_argument("--jobs", type=int, default=1, help="models trained at once (processes; useful on a GPU)")
    sr.set_defaults(fn=cmd_study_ratio)

    from ringlinear.rl.cli import add_rl_parser

    add_rl_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
