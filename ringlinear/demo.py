"""`ringlinear demo`: the whole system on one machine with no download. Train a byte-level BPE tokenizer and
a small Ring-linear hybrid (layer groups of Lightning + softmax layers, MoE, MTP) on a corpus, save it in the
HF layout, load it in the inference engine, generate, and report throughput, cache memory vs an all-softmax
twin, and the largest |logprob| gap between the trainer's forward and the engine on the generated tokens.

Default corpus: the Python reference help topics that ship with CPython (`pydoc_data.topics`, ~465 KB).
"""

from __future__ import annotations

import json
import os
import time

import torch

DEFAULT_PROMPTS = ["The \"if\" statement", "Assignment statements", "A function definition", "The import system"]


def default_corpus(path: str) -> str:
    """Write the CPython help topics as documents separated by blank-line triples; return the path."""
    try:
        import pydoc_data.topics as topics
    except ImportError:
        raise SystemExit("this Python has no pydoc_data: pass --corpus FILE (any UTF-8 text file)") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n\n".join(topics.topics.values()))
    return path


def stdlib_corpus(path: str, max_bytes: int = 16_000_000) -> str:
    """Write this Python's standard-library sources (no tests; about 11 MB on CPython 3.11) as one document per
    file, in sorted order, up to `max_bytes`; return the path. A larger offline corpus than the help topics."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
    total = 0
    with open(path, "w", encoding="utf-8") as out:
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip)
            for name in sorted(f for f in files if f.endswith(".py")):
                try:
                    with open(os.path.join(d, name), encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if total + len(text) > max_bytes:
                    return path
                out.write(text + "\n\n\n")
                total += len(text) + 3
    if total == 0:
        raise SystemExit(f"no Python sources under {root}: pass --corpus FILE (any UTF-8 text file)")
    return path


def prepare_tokenizer(corpus: str, vocab_size: int, out_dir: str):
    from ringlinear.tokenizer import tokenizer_files, train_bpe

    tok = train_bpe([corpus], vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    for name, text in tokenizer_files(tok).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return tok


def cache_bytes_per_token(config, context: int) -> tuple[float, float]:
    """(hybrid, all-softmax twin) cache bytes per token at `context` tokens: KV of softmax layers plus the
    linear layers' fixed fp32 state spread over the context."""
    from ringlinear.accounting import model_stats

    hybrid = model_stats(config)
    twin = model_stats(config.replace(layer_group_size=1))
    return hybrid.kv_bytes_per_token + hybrid.state_bytes_per_sequence / context, float(twin.kv_bytes_per_token)


@torch.no_grad()
def trainer_logprobs(model, prompt_ids: list[int], out_ids: list[int]) -> list[float]:
    """log p(out_ids[j] | prompt + out[:j]) from one full forward of the training model (no cache)."""
    ids = torch.tensor(prompt_ids + out_ids, device=next(model.parameters()).device)
    logp = torch.log_softmax(model(ids), dim=-1)
    n = len(prompt_ids)
    return [logp[n - 1 + j, t].item() for j, t in enumerate(out_ids)]


def run_demo(args) -> dict:
    from ringlinear.train.trainer import TrainConfig, Trainer

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    corpus = args.corpus or default_corpus(os.path.join(out, "corpus.txt"))
    print(f"[1/4] tokenizer: byte-level BPE, {args.vocab} tokens, trained on {corpus}")
    tok = prepare_tokenizer(corpus, args.vocab, os.path.join(out, "tokenizer"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    overrides = {"vocab_size": args.vocab, "eos_token_id": eos, "pad_token_id": pad, **args.model_overrides}
    cfg = TrainConfig(model=args.preset, model_overrides=overrides, tokenizer=os.path.join(out, "tokenizer"),
                      data=[corpus], seq_len=args.seq_len, micro_batch=args.batch, steps=args.steps, lr=args.lr,
                      warmup_steps=max(1, args.steps // 20), seed=args.seed, save_dir=os.path.join(out, "run"),
                      export_dtype="float32" if not torch.cuda.is_available() else "bfloat16", progress=True)
    print(f"[2/4] training preset {args.preset} for {args.steps} steps x {args.batch} x {args.seq_len} tokens")
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    hist = trainer.fit()
    train_s = time.perf_counter() - t0
    final = os.path.join(cfg.save_dir, "final")
    print(f"[3/4] saved the model in the HF layout at {final}; loading it in the engine")
    gen = generate_with_engine(final, args.prompts, args.max_tokens)
    print("[4/4] scoring the generated tokens with the trainer's forward")
    from ringlinear.hf import load_model

    scorer = load_model(final, device=trainer.device)
    scorer.eval()
    max_diff = 0.0
    for g in gen["outputs"]:
        ref = trainer_logprobs(scorer, g["prompt_ids"], g["token_ids"])
        max_diff = max([max_diff] + [abs(a - b) for a, b in zip(ref, g["logprobs"])])
    hybrid_bpt, twin_bpt = cache_bytes_per_token(trainer.model_config, args.report_context)
    report = {
        "train_tokens_per_s": sum(h["tokens_per_s"] for h in hist[-20:]) / min(20, len(hist)),
        "train_seconds": train_s,
        "first_loss": hist[0]["lm_loss"], "final_loss": hist[-1]["lm_loss"],
        "generation_tokens_per_s": gen["tokens_per_s"],
        "cache_bytes_per_token": hybrid_bpt, "softmax_twin_cache_bytes_per_token": twin_bpt,
        "cache_ratio_vs_twin": hybrid_bpt / twin_bpt, "report_context": args.report_context,
        "max_abs_logprob_diff_trainer_vs_engine": max_diff,
        "loss_plot": os.path.join(cfg.save_dir, "loss.png"), "checkpoint": final,
        "samples": [{"prompt": g["prompt"], "completion": g["text"]} for g in gen["outputs"]],
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    return report


def print_report(r: dict) -> None:
    print("\n=== ringlinear demo report ===")
    for s in r["samples"]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    print("---")
    print(f"training      {r['train_tokens_per_s']:.0f} tokens/s, loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} "
          f"({r['train_seconds']:.0f} s)")
    print(f"generation    {r['generation_tokens_per_s']:.1f} tokens/s (engine, batched)")
    print(f"cache memory  {r['cache_bytes_per_token']:.0f} B/token at {r['report_context']} tokens vs "
          f"{r['softmax_twin_cache_bytes_per_token']:.0f} B/token all-softmax twin ({r['cache_ratio_vs_twin']:.2f}x)")
    print(f"alignment     max |logprob trainer - engine| on generated tokens = {r['max_abs_logprob_diff_trainer_vs_engine']:.2e}")
    print(f"loss plot     {r['loss_plot']}")


def generate_with_engine(model_dir: str, prompts: list[str], max_tokens: int) -> dict:
    """Greedy generation through the engine with logprobs of the chosen tokens."""
    from ringlinear.engine.llm import LLM, SamplingParams

    llm = LLM(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    outs = []
    n_tokens = 0
    for p, r in zip(prompts, results):
        c = r.outputs[0]
        outs.append({"prompt": p, "prompt_ids": list(r.prompt_token_ids), "token_ids": list(c.token_ids),
                     "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)], "text": c.text})
        n_tokens += len(c.token_ids)
    return {"outputs": outs, "tokens_per_s": n_tokens / dt}
