"""Issue 5's comparison from run logs: V0.5's rollouts against GRPO's with G = 16, and its acc against GRPO's with
G = 4, seed by seed. V0.5 takes its training prompts from the stream grpo.py takes them from (a warm-up, if asked
for, comes from the stream's far end), so at one seed both methods train on the same prompts at every step and the
per-step acc difference is a paired comparison.

    python v05.py --seed S --out runs/v05_sS                                 # for S in 0 1 2
    python grpo.py --group-size 4 --steps 8 --seed S --out runs/g4_sS
    python benchmarks/v05_vs_grpo.py --v05 runs/v05_s0 runs/v05_s1 runs/v05_s2 --grpo runs/g4_s0 runs/g4_s1 runs/g4_s2

GRPO with G = 16 spends exactly 16 rollouts per prompt, so its count is 16 x the prompts the G = 4 run trained on
(4 x its rollouts); no run is needed to know it.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats


def metrics(run) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: not found (pass the run's --out folder)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                if int(r["step"]) > 0:  # training steps need acc; step 0 is the evaluation / warm-up row
                    float(r["acc"])
                rows.append(r)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"{path}:{i}: not a metrics row with step and acc ({e!r})") from None
    return rows


def compare(v05_run, grpo_run, grpo_group: int = 4, big_group: int = 16) -> dict:
    """One seed: -> dict(rollouts, share of G=big's, acc per step of both [steps], eval_acc of both)"""
    v, g = metrics(v05_run), metrics(grpo_run)
    vs, gs = [m for m in v if m["step"] > 0], [m for m in g if m["step"] > 0]
    if [m["step"] for m in vs] != [m["step"] for m in gs]:
        raise SystemExit(f"{v05_run} and {grpo_run} logged different steps; compare runs of the same --steps")
    spent = sum(m.get("rollouts") or 0 for m in v)  # the warm-up (step 0) counts
    big = sum(m["rollouts"] for m in gs) // grpo_group * big_group
    return dict(rollouts=spent, big=big, share=spent / big, acc_v05=np.array([m["acc"] for m in vs]),
                acc_grpo=np.array([m["acc"] for m in gs]), eval_v05=v[-1].get("eval_acc"), eval_grpo=g[-1].get("eval_acc"))


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v05", nargs="+", required=True, help="v05.py --out folders, one per seed")
    ap.add_argument("--grpo", nargs="+", required=True, help="grpo.py --group-size 4 --out folders, same seeds, same order")
    ap.add_argument("--grpo-group", type=int, default=4, help="the --group-size of the --grpo runs")
    a = ap.parse_args(argv)
    if len(a.v05) != len(a.grpo):
        raise SystemExit(f"--v05 has {len(a.v05)} runs and --grpo {len(a.grpo)}: pair them seed by seed")
    rows = [compare(v, g, a.grpo_group) for v, g in zip(a.v05, a.grpo)]
    print("| run | rollouts | share of G=16's | acc V0.5 (steps 1-4 -> 5-8) | acc G=4 | eval_acc V0.5 / G=4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v, r in zip(a.v05, rows):
        h = len(r["acc_v05"]) // 2
        print(f"| {v} | {r['rollouts']} | {r['share']:.0%} "
              f"| {r['acc_v05'][:h].mean():.2f} -> {r['acc_v05'][h:].mean():.2f} "
              f"| {r['acc_grpo'][:h].mean():.2f} -> {r['acc_grpo'][h:].mean():.2f} | {fmt(r['eval_v05'])} / {fmt(r['eval_grpo'])} |")
    d = np.concatenate([r["acc_v05"] - r["acc_grpo"] for r in rows])  # paired: same prompts, same step
    t = stats.ttest_1samp(d, 0.0)
    lo, hi = t.confidence_interval(0.95)
    print(f"\nshare of G=16's rollouts, all seeds: {sum(r['rollouts'] for r in rows) / sum(r['big'] for r in rows):.1%}")
    print(f"acc V0.5 - G=4 per step (paired, {len(d)} steps): mean {d.mean():+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]")
    ev = [(r["eval_v05"], r["eval_grpo"]) for r in rows if r["eval_v05"] is not None and r["eval_grpo"] is not None]
    if ev:
        print(f"eval_acc after training, mean over seeds: V0.5 {np.mean([e[0] for e in ev]):.3f}, "
              f"G=4 {np.mean([e[1] for e in ev]):.3f}")


if __name__ == "__main__":
    main()
