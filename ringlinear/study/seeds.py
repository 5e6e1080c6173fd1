"""Combine finished ratio-study folders (same settings, different --seed or widths) into one report: a table of
recall at each context per run, and a plot of recall vs context per ratio (each seed a thin line, the mean thick),
with the longest trained context marked (contexts past it come from --recall-eval-pairs).

    ringlinear study seeds runs/s0 runs/s1 runs/s2 --width 128 --png recall_seeds.png --json seeds.json

Runs must share their settings but for the seed (checked: the run JSONs' "setup"); it reads only run-*.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from ringlinear.study.ratio import trained_contexts


def load_runs(dirs: list[str], width: int | None) -> list[dict]:
    runs = []
    for d in dirs:
        paths = sorted(glob.glob(os.path.join(d, "run-*.json")))
        if not paths:
            raise SystemExit(f"study_seeds: no run-*.json in {d}")
        for p in paths:
            with open(p) as f:
                r = json.load(f)
            if width is None or r["width"] == width:
                r["_path"] = p
                runs.append(r)
    if not runs:
        raise SystemExit(f"study_seeds: no runs of width {width} in {dirs}")
    def comparable(setup: dict) -> dict:
        # the seed differs by design; older runs hold the corpus as a path (a different folder per study), newer
        # ones as its digest, which must agree
        return {k: v for k, v in setup.items()
                if k != "seed" and not (k == "corpus" and not str(v).startswith("sha256:"))}

    base = comparable(runs[0]["setup"])
    for r in runs[1:]:
        other = comparable(r["setup"])
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if diff:
            raise SystemExit(f"study_seeds: {r['_path']} differs from {runs[0]['_path']} in {diff}")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ringlinear study seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="study --out folders")
    ap.add_argument("--width", type=int, help="only runs of this width")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--json", help="write the table here")
    a = ap.parse_args(argv)
    runs = load_runs(a.dirs, a.width)
    runs.sort(key=lambda r: (r["width"], r["group_size"] if r["group_size"] else 10**6, r["setup"]["seed"]))
    ctxs = sorted(runs[0]["recall"], key=int)
    trained = trained_contexts(runs)
    print(f"{'width':>5} {'ratio':>11} {'seed':>4} {'text':>6} " + " ".join(
        f"rec@{c:>4}" + (" " if c in trained else "*") for c in ctxs))
    rows = []
    for r in runs:
        print(f"{r['width']:5d} {r['ratio']:>11} {r['setup']['seed']:4d} {r['text_loss']:6.3f} "
              + " ".join(f"{r['recall'][c]:9.2f}" for c in ctxs))
        rows.append({"width": r["width"], "ratio": r["ratio"], "seed": r["setup"]["seed"],
                     "text_loss": r["text_loss"], "recall": r["recall"], "run": r["_path"]})
    if set(ctxs) - trained:
        print("* a pair count no training sequence had (--recall-eval-pairs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"contexts": ctxs, "trained": sorted(trained, key=int), "runs": rows}, f, indent=1)
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [int(c) for c in ctxs]
        for i, ratio in enumerate(dict.fromkeys(r["ratio"] for r in runs)):
            rs = [r for r in runs if r["ratio"] == ratio]
            color = f"C{i}"
            for r in rs:
                ax.plot(x, [r["recall"][c] for c in ctxs], "-", color=color, lw=0.8, alpha=0.5)
            mean = [sum(r["recall"][c] for r in rs) / len(rs) for c in ctxs]
            ax.plot(x, mean, "o-", color=color, lw=2.2, label=f"{ratio} ({len(rs)} seed{'s' * (len(rs) > 1)})")
        if set(ctxs) - trained:
            ax.axvline(max(int(c) for c in trained), color="gray", ls=":", label="longest trained context")
        widths = sorted({r["width"] for r in runs})
        ax.set(xlabel="context (tokens)", ylabel="recall accuracy", ylim=(0, 1.03),
               title=f"recall vs context, width {','.join(map(str, widths))}, {len(runs)} runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
