"""Hybrid-ratio study (report, Sec. "hybrid ratio"): train a family of small models that differ only in
`layer_group_size` (all softmax, 1:1, 1:3, 1:7, all linear, ...) at a few widths on the same data and token
budget — a text corpus mixed with multi-query associative recall — and compare (a) LM loss, (b) recall
accuracy at growing context, (c) inference cost per decoded token (bytes read at a long context).
Each finished run is saved as JSON, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field

import torch

from ringlinear.accounting import model_stats
from ringlinear.config import preset
from ringlinear.study.recall import RecallTask, recall_accuracy

RECALL_FIRST_TOKEN = 260  # after the byte-level vocabulary (256 bytes + 4 specials)


@dataclass
class StudyConfig:
    corpus: str
    out: str = "runs/ratio-study"
    group_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 0])  # 1 = all softmax, 0 = all linear
    widths: list[int] = field(default_factory=lambda: [64, 128])
    num_layers: int = 8
    steps: int = 150
    seq_len: int = 256
    micro_batch: int = 8
    lr: float = 3e-3
    recall_keys: int = 64
    recall_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # eval contexts: 2P + 2Q tokens
    recall_queries: int = 8
    recall_fraction: float = 0.5  # share of training documents that are recall sequences
    cost_context: int = 32768
    seed: int = 0

    def label(self, g: int) -> str:
        if g == 0:
            return "all linear"
        if g == 1:
            return "all softmax"
        return f"1:{g - 1}"


def model_config(sc: StudyConfig, width: int, group_size: int):
    heads = max(2, width // 32)
    return preset("tiny", vocab_size=RECALL_FIRST_TOKEN + 2 * sc.recall_keys, hidden_size=width,
                  intermediate_size=3 * width, moe_intermediate_size=width, moe_shared_expert_intermediate_size=width,
                  num_hidden_layers=sc.num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  head_dim=32, layer_group_size=group_size, group_norm_size=min(2, heads), num_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=0,
                  eos_token_id=257, pad_token_id=256)


def build_dataset(sc: StudyConfig):
    from ringlinear.tokenizer import byte_level_tokenizer
    from ringlinear.train.data import PackedDataset, pack_rows, read_documents, tokenize_documents

    tok = byte_level_tokenizer()
    docs = tokenize_documents(read_documents([sc.corpus]), tok, 257)
    task = RecallTask(RECALL_FIRST_TOKEN + 2 * sc.recall_keys, sc.recall_keys, sc.recall_keys, RECALL_FIRST_TOKEN)
    gen = torch.Generator().manual_seed(sc.seed)
    rng = random.Random(sc.seed)
    n_recall = int(len(docs) * sc.recall_fraction / (1 - sc.recall_fraction)) if sc.recall_fraction < 1 else 0
    lm_tokens = sum(len(d) for d in docs)
    n_recall = max(n_recall, lm_tokens // 200)
    for _ in range(n_recall):
        p = rng.choice(sc.recall_pairs)
        docs.append(task.sample(p, sc.recall_queries, gen)[0].tolist())
    rng.shuffle(docs)
    return PackedDataset(*pack_rows(docs, sc.seq_len), seed=sc.seed), task


def cost_per_token(cfg, context: int) -> float:
    """Bytes a decode step reads per sequence at `context` tokens: activated bf16 weights (+ lm_head) shared
    over a batch of 1, the softmax KV of the whole context, and the linear state read + written."""
    s = model_stats(cfg)
    return 2 * (s.active_params + cfg.hidden_size * cfg.vocab_size) + s.kv_bytes_per_token * context \
        + 2 * s.state_bytes_per_sequence


def run_one(sc: StudyConfig, width: int, g: int, dataset, task) -> dict:
    from ringlinear.train.trainer import TrainConfig, Trainer

    cfg = model_config(sc, width, g)
    tc = TrainConfig(model="tiny", data=[sc.corpus], seq_len=sc.seq_len, micro_batch=sc.micro_batch, steps=sc.steps,
                     lr=sc.lr, warmup_steps=max(1, sc.steps // 20), seed=sc.seed, progress=False,
                     model_overrides={k: v for k, v in cfg.to_dict().items() if k in (
                         "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                         "moe_shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "layer_group_size", "group_norm_size", "num_experts",
                         "num_experts_per_tok", "n_group", "topk_group", "num_nextn_predict_layers")})
    dataset.epoch, dataset.index = 0, 0
    dataset._order = dataset._make_order()
    trainer = Trainer(tc, dataset=dataset)
    hist = trainer.fit()
    model = trainer.model.eval()
    recall = {str(2 * p + 2 * sc.recall_queries): recall_accuracy(model, task, p, sc.recall_queries, rows=32, seed=123)
              for p in sc.recall_pairs}
    tail = hist[-max(1, len(hist) // 10):]
    return {"width": width, "group_size": g, "ratio": sc.label(g), "params": model_stats(cfg).total_params,
            "lm_loss": sum(h["lm_loss"] for h in tail) / len(tail), "recall": recall,
            "cost_bytes_per_token": cost_per_token(cfg, sc.cost_context), "layer_types": cfg.layer_types}


def run_study(sc: StudyConfig) -> list[dict]:
    from tqdm import tqdm

    os.makedirs(sc.out, exist_ok=True)
    with open(os.path.join(sc.out, "study.json"), "w") as f:
        json.dump(asdict(sc), f, indent=2)
    dataset, task = build_dataset(sc)
    results = []
    runs = [(w, g) for w in sc.widths for g in sc.group_sizes]
    for w, g in tqdm(runs, desc="ratio study", unit="model"):
        path = os.path.join(sc.out, f"run-w{w}-g{g}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            continue
        res = run_one(sc, w, g, dataset, task)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(path + ".tmp", path)
        results.append(res)
    print_table(results)
    plot_study(results, sc.out)
    return results


def print_table(results: list[dict]) -> None:
    ctxs = list(results[0]["recall"]) if results else []
    print(f"{'width':>5} {'ratio':>11} {'params':>8} {'lm_loss':>8} " + " ".join(f"rec@{c:>4}" for c in ctxs)
          + "  cost KB/token@ctx")
    for r in results:
        print(f"{r['width']:5d} {r['ratio']:>11} {r['params'] / 1e6:7.2f}M {r['lm_loss']:8.3f} "
              + " ".join(f"{r['recall'][c]:8.2f}" for c in ctxs) + f"  {r['cost_bytes_per_token'] / 1024:10.1f}")


def plot_study(results: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ratios = sorted({r["ratio"] for r in results}, key=lambda x: [r["group_size"] for r in results if r["ratio"] == x][0])
    widest = max(r["width"] for r in results)
    for ratio in ratios:
        rs = sorted((r for r in results if r["ratio"] == ratio), key=lambda r: r["params"])
        axes[0].plot([r["params"] for r in rs], [r["lm_loss"] for r in rs], "o-", label=ratio)
        big = [r for r in rs if r["width"] == widest][0]
        axes[1].plot([int(c) for c in big["recall"]], list(big["recall"].values()), "o-", label=ratio)
        axes[2].scatter([big["cost_bytes_per_token"] / 1024], [sum(big["recall"].values()) / len(big["recall"])], label=ratio)
    axes[0].set(xscale="log", xlabel="parameters", ylabel="LM loss", title="loss vs size")
    axes[1].set(xlabel="context (tokens)", ylabel="recall accuracy", title=f"recall vs context (width {widest})")
    axes[2].set(xlabel="decode bytes read per token (KiB)", ylabel="mean recall", title="cost vs quality")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_study.png"), dpi=110)
    plt.close(fig)
