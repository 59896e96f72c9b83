"""Replay a v05 run's OUT/prompts.jsonl with other priors, on the same prompts and rewards.

The question it answers: is V0.5's spend limited by V0, or by what the run's history can tell about the next
step's prompts at all? Every predictor below sees the last H (prompt, success rate) rows of the run before
the step (the warm-up rows first, if the run had a warm-up), and predicts each of the step's prompts:
  v0            the run's V0 (v05.py's shipped one unless --v0) as v05.py runs it by default: the history plus
                this step's other prompts' k_init rates (leave-one-out, so a prompt's prior never sees its own
                rollouts)
  v0 history only  V0 on the history alone (v05.py --no-fresh-context)
  knn           k nearest history rows by cosine similarity of the backbone embedding (v0_eval.knn_baseline)
  context mean  the history's mean rate, the same prior for every prompt
  level mean    (built-in arith data only) the mean rate of the history rows generated from the same
                template level, shrunk to the context mean with 2 pseudo-rows: a predictor that is told
                which of the ten generators wrote the prompt, which no real prior knows
  v0 oracle shift  V0's predictions moved by one logit offset per step so that their mean equals the mean of
                the step's final rates: it reads the answers, so it is no prior but a bound on what any
                calibration of V0 (a per-step offset) could buy
The non-V0 predictors fall back to 0.5 where the history is still empty (step 1 of a run without a warm-up). For each: the
test's reject rate at k_init (exact: it needs only the first k_init rewards drawn), the prior's MSE and mean
error against each prompt's final empirical rate, and the spend the adaptive budget would have made, simulated
with Bernoulli draws at that final rate (the same for every predictor, so spends compare). Where the rows carry
the priors the run used, max_gap_to_logged_prior says how far the predictor is from them (v0 at the run's own
settings: ~0, the check that the replay reads what the run read).

    python v05.py --out runs/v05_default
    python benchmarks/v05_prior_replay.py runs/v05_default/prompts.jsonl [--history 16,64,128] [--v0 CKPT]
    python benchmarks/v05_prior_replay.py OLD/prompts.jsonl --history-init none   # runs from before --history-init
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import v0 as V0  # noqa: E402
import v05  # noqa: E402
import v0_eval  # noqa: E402


def read_run(path) -> dict[int, list[dict]]:
    by_step = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                by_step.setdefault(int(r["step"]), []).append(r)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"{path}:{i}: not a v05 prompts.jsonl row ({e})") from None
    if not set(by_step) - {0}:
        raise SystemExit(f"{path}: no training steps (step >= 1) to replay")
    return by_step


def shift_to_mean(p, target: float) -> np.ndarray:
    """p [N] moved by one offset d in logit space, sigmoid(logit(p) + d), so that its mean is target."""
    from scipy.optimize import brentq
    from scipy.special import expit, logit
    z, target = logit(np.clip(p, 1e-4, 1 - 1e-4)), float(np.clip(target, 1e-3, 1 - 1e-3))
    return expit(z + brentq(lambda d: expit(z + d).mean() - target, -30, 30))


def predictors(model, bb) -> dict:
    """name -> predict(ctx [(question, rate)], questions, fresh [(question, k_init rate)] of this step,
    final [N] this step's final rates (only the oracle-shift bound reads them)) -> [N]"""
    levels = {p.question: p.level for p in C.arith_problems("train")}
    embed = lambda texts: bb.pooled(bb.encode(texts)).numpy()  # noqa: E731 -> [N, d]

    def level_mean(ctx, qs, fresh, final):  # (sum of same-level rates + 2 m) / (same-level rows + 2); m = context mean
        y, m = np.array([r for _, r in ctx]), np.mean([r for _, r in ctx])
        lv = np.array([levels.get(q) for q, _ in ctx])  # None off the arith data: no row matches, the prior is m
        same = [(lv == levels[q]) if q in levels else np.zeros(len(y), bool) for q in qs]
        return np.array([(y[s].sum() + 2 * m) / (s.sum() + 2) for s in same])

    out = {"v0": lambda ctx, qs, fresh, final: v05.prior_from_v0(model, bb, ctx, qs, [r for _, r in fresh]),
           "v0 history only": lambda ctx, qs, fresh, final: v05.prior_from_v0(model, bb, ctx, qs),
           "knn": lambda ctx, qs, fresh, final: v0_eval.knn_baseline(embed([c for c, _ in ctx]),
                                                                     np.array([r for _, r in ctx]), embed(qs)),
           "context mean": lambda ctx, qs, fresh, final: np.full(len(qs), np.mean([r for _, r in ctx]))}
    out = {**out, "level mean": level_mean,
           "v0 oracle shift": lambda ctx, qs, fresh, final: shift_to_mean(out["v0"](ctx, qs, fresh, final), np.mean(final))}
    needs_history = lambda f: lambda ctx, qs, *rest: f(ctx, qs, *rest) if ctx else np.full(len(qs), 0.5)  # noqa: E731
    return {name: f if name.startswith("v0") else needs_history(f) for name, f in out.items()}


def replay(by_step, predict, H: int, k_init: int = 4, reps: int = 20, seed: int = 0, init=()) -> dict:
    """init: the rows the run's history started from (v05 --history-init), before any warm-up rows."""
    rate = lambda r, k=None: float(np.mean(r["rewards"][:k]))  # noqa: E731
    history = list(init) + [(r["question"], rate(r)) for r in by_step.get(0, [])]
    prior, r_init, r_final = [], [], []
    for s in sorted(set(by_step) - {0}):
        cur = by_step[s]
        prior += list(predict(history[-H:], [r["question"] for r in cur], [(r["question"], rate(r, k_init)) for r in cur],
                              np.array([rate(r) for r in cur])))
        r_init += [rate(r, k_init) for r in cur]
        r_final += [rate(r) for r in cur]
        history += [(r["question"], rate(r)) for r in cur]
    prior, r_init, r_final = map(np.array, (prior, r_init, r_final))
    reject = v05.fuse(r_init * k_init, np.full(len(prior), k_init), prior)[3]
    rng = np.random.default_rng(seed)
    draw = lambda counts: [rng.random(c) < p for c, p in zip(counts, r_final)]  # noqa: E731
    spend = np.mean([v05.adaptive_rollouts(draw, prior, k_init)["k"].mean() for _ in range(reps)])
    out = dict(reject_at_k_init=float(reject.mean()), prior_mse=float(np.mean((prior - r_final) ** 2)),
               prior_bias=float(np.mean(prior - r_final)), simulated_k_mean=float(spend))
    logged = [r.get("prior") for s in sorted(set(by_step) - {0}) for r in by_step[s]]
    if None not in logged:  # the priors the run itself used: how far this predictor is from them
        out["max_gap_to_logged_prior"] = float(np.max(np.abs(prior - np.array(logged))))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="?", default="runs/v05_default/prompts.jsonl", help="a v05 run's OUT/prompts.jsonl")
    ap.add_argument("--history", default="16,64,128", help="context lengths H to replay (comma-separated)")
    ap.add_argument("--v0", default=v05.V0_DEFAULT, help="V0 checkpoint (default: the one v05.py ships with)")
    ap.add_argument("--only", default="", help="comma-separated predictor names (default: all)")
    ap.add_argument("--history-init", default="auto", help="the rows the run's history started from, as v05.py's flag "
                    "(auto: --v0's own rows of --policy; none for runs made before that flag)")
    ap.add_argument("--policy", default="smollm2-135m@T0.7", help="with --history-init auto: the run's --model@T--temperature")
    a = ap.parse_args(argv)
    by_step = read_run(a.prompts)
    model, bb = V0.load_v0(a.v0)
    init = V0.initial_history(a.v0, a.history_init, 10**9, a.policy if a.history_init == "auto" else None)
    preds = predictors(model, bb)
    names = [n for n in (a.only.split(",") if a.only else preds) if n]
    if unknown := set(names) - set(preds):
        raise SystemExit(f"--only: unknown predictor(s) {sorted(unknown)}; choose from {sorted(preds)}")
    for H in map(int, a.history.split(",")):
        for name in names:
            res = replay(by_step, preds[name], H, init=init[-H:])
            print(f"H={H}\t{name:<13s}\t" + " ".join(f"{k}={v:.4f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
