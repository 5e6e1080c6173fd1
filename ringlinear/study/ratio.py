"""Hybrid-ratio study (report, Sec. "hybrid ratio"): train a family of small models that differ only in
`layer_group_size` (all softmax, 1:1, 1:3, 1:7, all linear, ...) at a few widths on the same data and token
budget — a text corpus mixed with multi-query associative recall — and compare (a) LM loss, (b) recall
accuracy at growing context, (c) inference cost per decoded token (bytes read at a long context).
Each finished run is saved as JSON (with the settings it ran under, so a resumed study never mixes runs of
different settings); with `save_every` a run also checkpoints and resumes mid-way. `jobs` trains several models
at once (separate processes; on a GPU the small models leave most of it idle).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time

import torch

from ringlinear.accounting import model_stats
from ringlinear.config import preset
from ringlinear.model import IGNORE_INDEX
from ringlinear.study.recall import RecallTask, recall_accuracy
from ringlinear.study.study_config import RECALL_FIRST_TOKEN, StudyConfig


def model_config(sc: StudyConfig, width: int, group_size: int):
    heads = sc.heads or max(2, width // 32)
    return preset("tiny", vocab_size=sc.vocab_size, hidden_size=width,
                  intermediate_size=3 * width, moe_intermediate_size=width, moe_shared_expert_intermediate_size=width,
                  num_hidden_layers=sc.num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  head_dim=sc.head_dim, layer_group_size=group_size, group_norm_size=min(2, heads), num_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=0,
                  eos_token_id=257, pad_token_id=256, initializer_range=sc.init_std or math.sqrt(2 / (5 * width)))


def build_dataset(sc: StudyConfig):
    from ringlinear.tokenizer import byte_level_tokenizer
    from ringlinear.train.data import PackedDataset, pack_rows, read_documents, tokenize_documents

    tok = byte_level_tokenizer()
    docs = tokenize_documents(read_documents([sc.corpus]), tok, 257)
    task = RecallTask(sc.vocab_size, sc.recall_keys, sc.num_values, RECALL_FIRST_TOKEN)
    gen = torch.Generator().manual_seed(sc.seed)
    rng = random.Random(sc.seed)
    rng.shuffle(docs)
    n_eval = max(1, int(len(docs) * sc.eval_fraction))
    if len(docs) - n_eval < 1:
        raise ValueError(f"study: the corpus has {len(docs)} document(s); need at least 2 (one is held out)")
    held, docs = docs[:n_eval], docs[n_eval:]
    try:
        heldout = PackedDataset(*pack_rows(held, sc.seq_len), shuffle=False)
    except ValueError:
        raise ValueError(f"study: the held-out {sc.eval_fraction:.0%} of the corpus is shorter than one row of "
                         f"seq_len={sc.seq_len} tokens: give a larger corpus or a larger eval_fraction") from None
    # Text: a random subset of documents no larger than the run reads (a corpus beyond the token budget would
    # only cost memory); recall sequences then make up `recall_fraction` of the tokens, each one fresh.
    budget = sc.steps * sc.micro_batch * sc.seq_len
    keep, lm_tokens = 0, 0
    while keep < len(docs) and lm_tokens < budget * (1 - sc.recall_fraction) * 1.05:
        lm_tokens += len(docs[keep])
        keep += 1
    docs = docs[:keep]
    mean_len = 2 * sum(sc.recall_pairs) / len(sc.recall_pairs) + 2 * sc.recall_queries
    n_recall = int(lm_tokens * sc.recall_fraction / (1 - sc.recall_fraction) / mean_len)
    masks = [[True] * len(d) for d in docs]
    for _ in range(n_recall):
        p = rng.choice(sc.recall_pairs)
        ids, labels = task.sample(p, sc.recall_queries, gen)
        docs.append(ids.tolist())
        masks.append((labels != IGNORE_INDEX).tolist() if sc.recall_loss == "answers" else [True] * len(ids))
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs, masks = [docs[i] for i in order], [masks[i] for i in order]
    # A recall sequence cut by a row boundary loses its pairs to the previous row: its answers are noise there.
    start = 0
    for d, m in zip(docs, masks):
        if not all(m) and start // sc.seq_len != (start + len(d) - 1) // sc.seq_len:
            m[:] = [False] * len(m)
        start += len(d)
    tokens, segs, mask = pack_rows(docs, sc.seq_len, masks)
    return PackedDataset(tokens, segs, seed=sc.seed, loss_mask=mask), task, heldout


@torch.no_grad()
def heldout_text_loss(model, heldout, micro_batch: int, max_rows: int = 64) -> float:
    """Mean next-token loss (nats) on held-out text rows (never trained on; no recall sequences)."""
    dev = next(model.parameters()).device
    rows = list(range(min(max_rows, heldout.num_rows)))
    losses = []
    for i in range(0, len(rows), micro_batch):
        ids, cu = heldout.batch(rows[i : i + micro_batch])
        losses.append(model.loss(ids.to(dev), cu.to(dev))["lm_loss"].float().item())
    return sum(losses) / len(losses)


def cost_per_token(cfg, context: int) -> float:
    """Bytes a decode step reads per sequence at `context` tokens: activated bf16 weights (+ lm_head) shared
    over a batch of 1, the softmax KV of the whole context, and the linear state read + written."""
    s = model_stats(cfg)
    return 2 * (s.active_params + cfg.hidden_size * cfg.vocab_size) + s.kv_bytes_per_token * context \
        + 2 * s.state_bytes_per_sequence


def run_one(sc: StudyConfig, width: int, g: int, dataset, task, heldout) -> dict:
    from ringlinear.train.trainer import TrainConfig, Trainer

    cfg = model_config(sc, width, g)
    ckpt_dir = os.path.join(sc.out, f"ckpt-w{width}-g{g}") if sc.save_every else None
    tc = TrainConfig(model="tiny", data=[sc.corpus], seq_len=sc.seq_len, micro_batch=sc.micro_batch, steps=sc.steps,
                     lr=sc.lr, warmup_steps=max(1, sc.steps // 20), seed=sc.seed, progress=False,
                     save_dir=ckpt_dir, save_every=sc.save_every, resume=bool(ckpt_dir), keep_checkpoints=1,
                     export=False, plot=False, embedding_init_std=sc.embedding_init_std, compute_dtype=sc.compute_dtype,
                     model_overrides={k: v for k, v in cfg.to_dict().items() if k in (
                         "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                         "moe_shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "layer_group_size", "group_norm_size", "num_experts",
                         "num_experts_per_tok", "n_group", "topk_group", "num_nextn_predict_layers",
                         "initializer_range")})
    dataset.rewind()
    trainer = Trainer(tc, dataset=dataset)

    def measure(model, rows: int) -> dict[str, float]:
        model.eval()
        acc = {str(2 * p + 2 * sc.recall_queries): recall_accuracy(model, task, p, sc.recall_queries, rows=rows,
                                                                   seed=123) for p in sc.eval_pairs}
        model.train()
        return acc

    # Train in chunks (fit resumes where it stopped): a progress line per chunk in run-wW-gG.log, and with
    # eval_every the recall curve over the steps.
    chunk = sc.eval_every or max(1, sc.steps // 10)
    t0, history = time.perf_counter(), []
    with open(_run_path(sc, width, g)[:-5] + ".log", "a") as log:
        while trainer.step < sc.steps:
            hist = trainer.fit(stop_after=min(sc.steps, (trainer.step // chunk + 1) * chunk))
            line = f"step {trainer.step}/{sc.steps} lm_loss {hist[-1]['lm_loss']:.3f} {time.perf_counter() - t0:.0f}s"
            if sc.eval_every and trainer.step < sc.steps:
                history.append({"step": trainer.step, "recall": measure(trainer.model, min(16, sc.recall_rows))})
                line += " recall " + " ".join(f"{v:.2f}" for v in history[-1]["recall"].values())
            print(line, file=log, flush=True)
    seconds = time.perf_counter() - t0
    recall = measure(trainer.model, sc.recall_rows)
    model = trainer.model.eval()
    if sc.eval_every:
        history.append({"step": trainer.step, "recall": recall})
    tail = hist[-max(1, len(hist) // 10):]
    res = {"width": width, "group_size": g, "ratio": sc.label(g), "params": model_stats(cfg).total_params,
           "lm_loss": sum(h["lm_loss"] for h in tail) / len(tail),
           "text_loss": heldout_text_loss(model, heldout, sc.micro_batch), "recall": recall,
           "cost_bytes_per_token": cost_per_token(cfg, sc.cost_context), "layer_types": cfg.layer_types,
           "train_seconds": round(seconds, 1), "device": str(trainer.device), "recall_history": history,
           "setup": sc.setup()}
    del trainer, model
    if ckpt_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return res


def _run_path(sc: StudyConfig, w: int, g: int) -> str:
    return os.path.join(sc.out, f"run-w{w}-g{g}.json")


def _load_done(sc: StudyConfig, w: int, g: int) -> dict | None:
    path = _run_path(sc, w, g)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    old, new = res.get("setup"), sc.setup()
    if old != new:
        diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
        raise ValueError(f"study: {path} was trained with other settings (differing: {diff}); "
                         f"use a new --out directory or delete that file to retrain it")
    return res


def _save_run(sc: StudyConfig, w: int, g: int, res: dict) -> dict:
    path = _run_path(sc, w, g)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    return res


def _job(sc: StudyConfig, w: int, g: int) -> dict:
    """Train and save one model in a worker process (which builds its own copy of the data). The worker takes
    its share of the CPU threads: each of `jobs` processes defaulting to all cores oversubscribes them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sc.jobs))
    return _save_run(sc, w, g, run_one(sc, w, g, *build_dataset(sc)))


def run_study(sc: StudyConfig) -> list[dict]:
    from tqdm import tqdm

    sc.validate()
    os.makedirs(sc.out, exist_ok=True)
    with open(os.path.join(sc.out, "study.json"), "w") as f:
        json.dump(sc.to_dict(), f, indent=2)
    runs = [(w, g) for w in sc.widths for g in sc.group_sizes]
    done = {(w, g): r for w, g in runs if (r := _load_done(sc, w, g)) is not None}
    todo = [rg for rg in runs if rg not in done]
    if done:
        print(f"ratio study: {len(done)} of {len(runs)} models already trained in {sc.out}", flush=True)
    bar = tqdm(total=len(runs), initial=len(done), desc="ratio study", unit="model")
    if sc.jobs == 1 or len(todo) <= 1:
        data = build_dataset(sc) if todo else None
        for w, g in todo:
            done[(w, g)] = _save_run(sc, w, g, run_one(sc, w, g, *data))
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=sc.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_job, sc, w, g): (w, g) for w, g in todo}
            for fut in as_completed(futs):
                done[futs[fut]] = fut.result()
                bar.set_postfix(last=f"w{futs[fut][0]} {sc.label(futs[fut][1])}")
                bar.update(1)
    bar.close()
    results = [done[rg] for rg in runs]
    print_table(results)
    plot_study(results, sc.out)
    return results


def trained_contexts(results: list[dict]) -> set[str]:
    """Recall contexts (as the results' keys) that training saw; the others come from recall_eval_pairs."""
    setup = results[0].get("setup", {}) if results else {}
    q = setup.get("recall_queries")
    pairs = setup.get("recall_pairs")
    if q is None or pairs is None:
        return set(results[0]["recall"]) if results else set()
    return {str(2 * p + 2 * q) for p in pairs}


def print_table(results: list[dict]) -> None:
    ctxs = list(results[0]["recall"]) if results else []
    trained = trained_contexts(results)
    print(f"{'width':>5} {'ratio':>11} {'params':>8} {'train':>7} {'text':>7} "
          + " ".join(f"rec@{c:>4}" + (" " if c in trained else "*") for c in ctxs) + "  decode KiB/token")
    for r in results:
        print(f"{r['width']:5d} {r['ratio']:>11} {r['params'] / 1e6:7.2f}M {r['lm_loss']:7.3f} {r['text_loss']:7.3f} "
              + " ".join(f"{r['recall'][c]:9.2f}" for c in ctxs) + f"  {r['cost_bytes_per_token'] / 1024:16.1f}")
    if set(ctxs) - trained:
        print("* a pair count no training sequence had (--recall-eval-pairs)")


def plot_study(results: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = any(r.get("recall_history") for r in results)
    trained = trained_contexts(results)
    fig, axes = plt.subplots(1, 4 if curves else 3, figsize=(20 if curves else 15, 4))
    ratios = sorted({r["ratio"] for r in results}, key=lambda x: [r["group_size"] for r in results if r["ratio"] == x][0])
    widest = max(r["width"] for r in results)
    for ratio in ratios:
        rs = sorted((r for r in results if r["ratio"] == ratio), key=lambda r: r["params"])
        axes[0].plot([r["params"] for r in rs], [r["text_loss"] for r in rs], "o-", label=ratio)
        big = [r for r in rs if r["width"] == widest][0]
        axes[1].plot([int(c) for c in big["recall"]], list(big["recall"].values()), "o-", label=ratio)
        axes[2].scatter([big["cost_bytes_per_token"] / 2**20], [sum(big["recall"].values()) / len(big["recall"])], label=ratio)
        if curves and big.get("recall_history"):
            h = big["recall_history"]
            c = max(trained, key=int)
            axes[3].plot([e["step"] for e in h], [e["recall"][c] for e in h], "o-", ms=3, label=ratio)
    sizes = [r["params"] for r in results]
    wide = bool(sizes) and max(sizes) >= 10 * min(sizes)  # a log axis only when the sizes span a decade
    axes[0].set(xscale="log" if wide else "linear", xlabel="parameters", ylabel="held-out text loss (nats)",
                title="loss vs size")
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set(xlabel="context (tokens)", ylabel="recall accuracy", title=f"recall vs context (width {widest})")
    if results and set(results[0]["recall"]) - trained:
        axes[1].axvline(max(int(c) for c in trained), color="gray", ls=":", label="longest trained")
    ctx = results[0].get("setup", {}).get("cost_context", 32768) if results else 32768
    axes[2].set(xlabel=f"decode bytes read per token at {ctx} tokens of context (MiB)", ylabel="mean recall",
                title="cost vs quality")
    if curves:
        longest = max(trained, key=int)
        axes[3].set(xlabel="training step", ylabel=f"recall at {longest} tokens", title=f"learning recall (width {widest})")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_study.png"), dpi=110)
    plt.close(fig)
