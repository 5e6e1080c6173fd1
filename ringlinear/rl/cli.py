"""`ringlinear rl --config FILE`: an RL run from a JSON `RLConfig` (progress bar with reward and mismatch,
`history.json` and `reward.png` under `out_dir`). `ringlinear/cli.py` calls `add_rl_parser(subparsers)`."""

from __future__ import annotations

import argparse
import json


def add_rl_parser(subparsers) -> argparse.ArgumentParser:
    sp = subparsers.add_parser("rl", help="RL (GRPO/PPO) with engine rollouts and trainer updates aligned; "
                                          "JSON config, reward curve")
    sp.add_argument("--config", required=True, help="JSON file with RLConfig fields (ringlinear/rl/config.py)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (JSON value)")
    sp.add_argument("--out", help="output directory (overrides out_dir)")
    sp.set_defaults(fn=run_rl)
    return sp


def _overrides(pairs: list[str] | None) -> dict:
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


def run_rl(args) -> int:
    from ringlinear.rl.config import RLConfig
    from ringlinear.rl.loop import RLRun

    try:
        with open(args.config) as f:
            d = json.load(f)
        d.update(_overrides(args.set))
        if args.out:
            d["out_dir"] = args.out
        cfg = RLConfig.from_dict(d)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    run = RLRun(cfg)
    hist = run.run()
    if hist:
        last = {k: v for k, v in hist[-1].items() if k != "example"}
        print(json.dumps(last))
    if run.evals:
        print(json.dumps({"eval_accuracy": [(e["step"], e["eval_accuracy"]) for e in run.evals]}))
    if cfg.out_dir:
        print(f"wrote {cfg.out_dir}/history.json" + (f", {cfg.out_dir}/reward.png" if cfg.plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (until the maintainer wires `add_rl_parser` into `ringlinear`)."""
    p = argparse.ArgumentParser(prog="ringlinear")
    add_rl_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
