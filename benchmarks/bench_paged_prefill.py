"""Paged prefill attention on the device, Ring-mini softmax-layer shapes (H 16, Hkv 4, D 128, bf16, block 16):
our one-launch Triton kernel over the pages against today's engine path (gather each prefix from the pages, then
`prefix_chunk_attention`: two flash calls + merge, one sequence at a time) and SDPA flash on contiguous K/V of the
same lengths (a ceiling: no paging, no gather). Causal FLOPs = 4 * H * D * sum over queries of keys seen.

    python benchmarks/bench_paged_prefill.py --json out.json      (needs CUDA)
    python benchmarks/bench_paged_prefill.py --sweep --cases a112k,b8x2k --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from functools import partial

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from ringlinear.ops.attention import causal_attention, prefix_chunk_attention
from ringlinear.ops.paged_attention.naive import naive_paged_prefill_attention
from ringlinear.ops.paged_attention.prefill import PrefillConfig, default_config
from ringlinear.ops.paged_attention.prefill import fused_paged_prefill_attention as paged_prefill_attention

H, HKV, D, BS = 16, 4, 128, 16
DTYPE = torch.bfloat16
K = 1024
# name -> (prefix lengths, chunk lengths): (a) the four 16K chunks of a 128K prompt, (b) 8 chunks of 2K after
# 4K..32K prefixes, (mixed) one 4K chunk with 31 decode rows in the same batch
CASES = {
    "a0": ([0], [16 * K]),
    "a16k": ([16 * K], [16 * K]),
    "a48k": ([48 * K], [16 * K]),
    "a112k": ([112 * K], [16 * K]),
    "b8x2k": ([4 * K * (i + 1) for i in range(8)], [2 * K] * 8),
    "mixed": ([28 * K] + [8 * K + 777 * i for i in range(31)], [4 * K] + [1] * 31),
}
SWEEP = dict(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


def bench(fn) -> float:
    """Median ms; fewer repetitions for calls of tens of ms."""
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=300, return_mode="median")


def rel(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def causal_flops(prefixes, chunks) -> float:
    keys_seen = sum(c * p + c * (c + 1) // 2 for p, c in zip(prefixes, chunks))
    return 4 * H * D * keys_seen


class Batch:
    """One engine step's softmax-layer inputs: packed queries, the chunks' own K/V (what the layer computed),
    a [2, num_blocks, BS, Hkv, D] cache holding every sequence's keys on shuffled pages, int32 metadata."""

    def __init__(self, prefixes, chunks, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.prefixes, self.chunks = prefixes, chunks
        self.lens = [p + c for p, c in zip(prefixes, chunks)]
        nblk = [-(-L // BS) for L in self.lens]
        W = max(nblk)
        nb = sum(nblk) + 1
        self.kv = torch.randn(2, nb, BS, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
        perm = torch.randperm(nb, device="cuda", generator=gen)
        bt = torch.zeros(len(chunks), W, dtype=torch.int32, device="cuda")
        at = 0
        for n, m in enumerate(nblk):
            bt[n, :m] = perm[at : at + m].int()
            at += m
        self.block_tables = bt
        self.q = torch.randn(sum(chunks), H, D, device="cuda", dtype=DTYPE, generator=gen)
        self.bounds = [0, *itertools.accumulate(chunks)]
        self.cu = torch.tensor(self.bounds, dtype=torch.int32, device="cuda")
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32, device="cuda")
        self.scale = D**-0.5
        news = [self.keys(n)[:, p:] for n, p in enumerate(prefixes)]
        self.k_new = torch.cat([x[0] for x in news])  # [Tq, Hkv, D]
        self.v_new = torch.cat([x[1] for x in news])

    def keys(self, n):
        """Sequence n's K and V in order: [2, L, Hkv, D]."""
        pages = self.block_tables[n, : -(-self.lens[n] // BS)].long()
        return self.kv[:, pages].flatten(1, 2)[:, : self.lens[n]]

    def ours(self, config=None, out=None):
        return paged_prefill_attention(self.q, self.kv[0], self.kv[1], self.block_tables, self.cu, self.seq_lens,
                                       self.scale, max_seqlen_q=max(self.chunks), out=out, config=config)

    def today(self):
        """`PagedContext.softmax_attention` after the K/V write, as the engine runs it now."""
        b, outs = self.bounds, []
        nb, bs = self.kv.shape[1:3]
        for n, start in enumerate(self.prefixes):
            qn, kn, vn = self.q[b[n] : b[n + 1]], self.k_new[b[n] : b[n + 1]], self.v_new[b[n] : b[n + 1]]
            if start == 0:
                outs.append(causal_attention(qn, kn, vn, self.scale))
                continue
            nblk = -(-start // bs)
            prefix = self.kv[:, self.block_tables[n, :nblk].long()].reshape(2, nblk * bs, HKV, D)[:, :start]
            outs.append(prefix_chunk_attention(qn, kn, vn, prefix[0], prefix[1], self.scale))
        return torch.cat(outs, 0)

    def gather_only(self):
        """The prefix gathers of `today` alone (what reading straight from the pages saves)."""
        return [self.kv[:, self.block_tables[n, : -(-p // BS)].long()] for n, p in enumerate(self.prefixes) if p]

    def contiguous_heads(self):
        """Per sequence: K, V as [1, H, L, D], heads repeated (outside the timed region) for SDPA flash."""
        out = []
        for n in range(len(self.lens)):
            k, v = self.keys(n)
            out.append(tuple(x.repeat_interleave(H // HKV, 1).transpose(0, 1)[None].contiguous() for x in (k, v)))
        return out

    def ceiling(self, kvh):
        """SDPA flash on contiguous K/V, lower-right causal (torch dispatches it to the flash kernel)."""
        b, outs = self.bounds, []
        for n, (k, v) in enumerate(kvh):
            qn = self.q[b[n] : b[n + 1]].transpose(0, 1)[None]
            mask = causal_lower_right(qn.shape[2], k.shape[2])
            outs.append(F.scaled_dot_product_attention(qn, k, v, attn_mask=mask, scale=self.scale)[0].transpose(0, 1))
        return torch.cat(outs, 0)

    def reference_windows(self, out, width=64) -> float:
        """Worst rel error of `out` against the fp32 reference on the first, middle and last `width` queries of
        every chunk (the reference's boolean mask at full size would not fit: a window of queries i0..i1 of a
        chunk is itself a chunk: the last i1 - i0 of prefix + i1 positions)."""
        worst = 0.0
        for n, (p, c) in enumerate(zip(self.prefixes, self.chunks)):
            starts = sorted({0, max(0, c // 2 - width // 2), max(0, c - width)})
            for i0 in starts:
                i1 = min(c, i0 + width)
                a = self.bounds[n] + i0
                cu = torch.tensor([0, i1 - i0], dtype=torch.int32, device="cuda")
                sl = torch.tensor([p + i1], dtype=torch.int32, device="cuda")
                ref = naive_paged_prefill_attention(self.q[a : a + i1 - i0], self.kv[0], self.kv[1],
                                                    self.block_tables[n : n + 1], cu, sl, self.scale)
                worst = max(worst, rel(out[a : a + i1 - i0], ref))
        return worst


def run_case(name, prefixes, chunks, config=None) -> dict:
    bt = Batch(prefixes, chunks)
    fl = causal_flops(prefixes, chunks)
    kvh = bt.contiguous_heads()
    ceil_out = bt.ceiling(kvh)
    poisoned = torch.full_like(bt.q, float("nan"))
    ours_out = bt.ours(config, out=poisoned)
    today_out = bt.today()
    row = {"case": name, "seqs": len(chunks), "Tq": sum(chunks), "max_keys": max(bt.lens), "GFLOP": fl / 1e9,
           "config": vars(config or default_config(D, DTYPE, H // HKV, max(chunks))),
           "rel_ours_vs_ref_windows": bt.reference_windows(ours_out),
           "rel_ceiling_vs_ref_windows": bt.reference_windows(ceil_out),
           "rel_ours_vs_ceiling": rel(ours_out, ceil_out), "rel_today_vs_ceiling": rel(today_out, ceil_out)}
    if not row["rel_ours_vs_ref_windows"] < 2e-2 or not row["rel_ours_vs_ceiling"] < 2e-2:
        raise RuntimeError(f"{name}: paged prefill disagrees with the reference: {row}")
    del ours_out, today_out, ceil_out, poisoned
    row["ours_ms"] = bench(partial(bt.ours, config))
    row["today_ms"] = bench(bt.today)
    row["gather_ms"] = bench(bt.gather_only) if any(prefixes) else 0.0
    row["ceiling_ms"] = bench(partial(bt.ceiling, kvh))
    for k in ("ours", "today", "ceiling"):
        row[f"{k}_TFLOPs"] = fl / row[f"{k}_ms"] / 1e9
    row["today_over_ours"] = row["today_ms"] / row["ours_ms"]
    row["ours_over_ceiling_rate"] = row["ours_TFLOPs"] / row["ceiling_TFLOPs"]
    del kvh, bt
    torch.cuda.empty_cache()
    return row


def sweep_case(name, prefixes, chunks) -> list[dict]:
    """Our kernel over the SWEEP grid (configs that do not fit the SM are recorded with their error)."""
    bt = Batch(prefixes, chunks)
    fl = causal_flops(prefixes, chunks)
    ref = bt.ours()
    rows = []
    for bm, bn, w, s in itertools.product(*SWEEP.values()):
        cfg = PrefillConfig(bm, bn, w, s)
        row = {"case": name, **vars(cfg)}
        try:
            err = rel(bt.ours(cfg), ref)
            if not err < 1e-2:
                raise RuntimeError(f"rel error {err} against the default config")
            row["ms"] = bench(partial(bt.ours, cfg))
            row["TFLOPs"] = fl / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - out of shared memory / registers: note it and go on
            row["error"] = repr(e)[:200]
        rows.append(row)
        print(f"  {name:8s} bm {bm:3d} bn {bn:3d} w {w} s {s}: "
              + (f"{row['ms']:8.3f} ms {row['TFLOPs']:6.1f} TFLOP/s" if "ms" in row else row["error"][:80]), flush=True)
    del bt
    torch.cuda.empty_cache()
    return rows


def print_table(rows):
    cols = [("case", "{:>8s}"), ("Tq", "{:>6d}"), ("max_keys", "{:>8d}"), ("ours_ms", "{:>8.2f}"),
            ("today_ms", "{:>8.2f}"), ("gather_ms", "{:>9.2f}"), ("ceiling_ms", "{:>10.2f}"),
            ("ours_TFLOPs", "{:>11.1f}"), ("today_TFLOPs", "{:>12.1f}"), ("ceiling_TFLOPs", "{:>14.1f}"),
            ("today_over_ours", "{:>15.2f}"), ("ours_over_ceiling_rate", "{:>22.2f}"),
            ("rel_ours_vs_ref_windows", "{:>23.1e}")]
    print(" ".join(f"{c:>{len(f.format(rows[0][c]))}s}" for c, f in cols))
    for r in rows:
        print(" ".join(f.format(r[c]) for c, f in cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--sweep", action="store_true", help="time our kernel over block_m/block_n/warps/stages")
    ap.add_argument("--config", default=None, help="block_m,block_n,num_warps,num_stages for the main table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged_prefill needs a CUDA device")
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; known: {list(CASES)}")
    config = PrefillConfig(*(int(x) for x in args.config.split(","))) if args.config else None
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": {"H": H, "Hkv": HKV, "D": D, "block_size": BS, "dtype": str(DTYPE)}}
    if args.sweep:
        res["sweep"] = []
        for name in names:
            res["sweep"] += sweep_case(name, *CASES[name])
        best = {}
        for r in res["sweep"]:
            if "ms" in r and (r["case"] not in best or r["ms"] < best[r["case"]]["ms"]):
                best[r["case"]] = r
        res["sweep_best"] = best
        for name, r in best.items():
            print(f"best {name}: {r}")
    rows = []
    for name in names:
        rows.append(run_case(name, *CASES[name], config=config))
        print({k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in rows[-1].items()},
              flush=True)
    res["rows"] = rows
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
