"""Replay a v05 run's OUT/prompts.jsonl with other contexts for V0's prior, on the same prompts and rewards.

For each variant: the test's reject rate at k_init (exact: it only needs the first k_init rewards drawn), the
prior's MSE and mean error against each prompt's final empirical rate, and the spend the adaptive budget would
have made, simulated with Bernoulli draws at that final rate (the same for every variant, so spends compare).
Variants: V0 reading the last H history rows (H = 16, 32, 64, 128), with or without this step's other prompts'
k_init rates added to the context (leave-one-out, so a prompt's prior never sees its own rollouts).

    python v05.py --out runs/v05_default
    python benchmarks/v05_prior_replay.py runs/v05_default/prompts.jsonl
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import v0 as V0  # noqa: E402
import v05  # noqa: E402


def replay(by_step, model, bb, H, fresh, k_init=4, reps=20, seed=0):
    rate = lambda r, k=None: float(np.mean(r["rewards"][:k]))  # noqa: E731
    history, prior, r_init, r_final = [(r["question"], rate(r)) for r in by_step[0]], [], [], []
    for s in sorted(by_step)[1:]:
        cur, ctx = by_step[s], history[-H:]
        if fresh:
            p = [v05.prior_from_v0(model, bb, ctx + [(c["question"], rate(c, k_init)) for j, c in enumerate(cur) if j != i],
                                   [r["question"]])[0] for i, r in enumerate(cur)]
        else:
            p = v05.prior_from_v0(model, bb, ctx, [r["question"] for r in cur])
        prior += list(p)
        r_init += [rate(r, k_init) for r in cur]
        r_final += [rate(r) for r in cur]
        history += [(r["question"], rate(r)) for r in cur]
    prior, r_init, r_final = map(np.array, (prior, r_init, r_final))
    reject = v05.fuse(r_init * k_init, np.full(len(prior), k_init), prior)[3]
    rng = np.random.default_rng(seed)
    draw = lambda counts: [rng.random(c) < p for c, p in zip(counts, r_final)]  # noqa: E731
    spend = np.mean([v05.adaptive_rollouts(draw, prior, k_init, round_max=2)["k"].mean() for _ in range(reps)])
    return dict(H=H, fresh=fresh, reject_at_k_init=float(reject.mean()), prior_mse=float(np.mean((prior - r_final) ** 2)),
                prior_bias=float(np.mean(prior - r_final)), simulated_k_mean=float(spend))


def main(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    if 0 not in by_step:
        raise SystemExit(f"{path}: no warm-up rows (step 0); replay needs a run with --prior v0 and --warmup-prompts > 0")
    model, bb = V0.load_v0(V0.PRETRAINED)
    for H in (16, 32, 64, 128):
        for fresh in (False, True):
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in replay(by_step, model, bb, H, fresh).items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/v05_default/prompts.jsonl")
