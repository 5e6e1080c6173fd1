"""Recall-only MQAR probe (CPU-sized): one study model (`ringlinear.study.ratio.model_config`, study init) trained on
multi-query associative recall alone, answers-only loss, the pair count cycling through `--pairs`; prints recall
accuracy at each pair count every 100 steps. Used to find which task sizes a model learns at all before spending
GPU time on a full ratio study (README, ratio study: "CPU probes").

    ringlinear study probe --keys 64 --values 32 --group-size 1 --layers 2 --width 64 --steps 3000 \
        --pairs 4,8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ringlinear.model import init_model
from ringlinear.study.ratio import model_config
from ringlinear.study.recall import RecallTask, recall_accuracy
from ringlinear.study.study_config import RECALL_FIRST_TOKEN, StudyConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ringlinear study probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=32)
    ap.add_argument("--values", type=int, default=0, help="0: as many as keys")
    ap.add_argument("--group-size", type=int, default=1, help="1 all softmax, 0 all linear, M: 1:(M-1)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=0, help="0: width // 32, at least 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pairs", default="4,8,16,32", help="pair counts, cycled over the steps and evaluated")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tokens", type=int, default=0,
                    help="tokens per step (0: 4 x max(4, 256 // sequence length) rows, ~1-2.5K tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the accuracy history here")
    a = ap.parse_args(argv)
    pairs = [int(p) for p in a.pairs.split(",")]
    if a.tokens < 0:
        ap.error(f"--tokens must be >= 0 (0: the default batch), got {a.tokens}")
    sc = StudyConfig(corpus="-", num_layers=a.layers, recall_keys=a.keys, recall_values=a.values, head_dim=a.head_dim,
                     heads=a.heads,
                     group_sizes=[a.group_size], widths=[a.width], recall_pairs=pairs, recall_queries=a.queries,
                     seq_len=max(2 * p + 2 * a.queries for p in pairs))
    sc.validate()
    torch.set_num_threads(a.threads)
    cfg = model_config(sc, a.width, a.group_size)
    torch.manual_seed(a.seed)
    model = init_model(cfg, seed=a.seed, embedding_std=sc.embedding_init_std).to(a.device)
    task = RecallTask(cfg.vocab_size, sc.recall_keys, sc.num_values, RECALL_FIRST_TOKEN)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    hist, t0 = [], time.time()
    for step in range(a.steps):
        p = pairs[step % len(pairs)]
        n = 2 * p + 2 * a.queries
        rows = max(1, a.tokens // n) if a.tokens else max(4, 256 // n) * 4
        ids, labels, cu = task.batch(rows, p, a.queries, seed=step + 1_000_003 * a.seed)
        loss = model.loss(ids.to(a.device), cu.to(a.device), labels=labels.to(a.device))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == a.steps:
            model.eval()
            acc = {q: recall_accuracy(model, task, q, a.queries, rows=32, seed=99) for q in pairs}
            model.train()
            hist.append({"step": step + 1, "loss": loss.item(), "recall": acc})
            print(f"step {step + 1:5d} loss {loss.item():.3f} recall " + " ".join(f"{q}:{v:.2f}" for q, v in acc.items())
                  + f"  {time.time() - t0:.0f}s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "history": hist}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
