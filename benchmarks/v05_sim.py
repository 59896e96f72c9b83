"""V0.5 in a Bernoulli world: baseline MSE against rollouts spent, no LM, a few seconds.

Each prompt has a known success rate p ~ Uniform(0, 1) and a prior V = clip(p + N(0, sigma^2), 0, 1) of
controlled error sigma; rewards are Bernoulli(p). The same `v05.adaptive_rollouts` that drives training
decides how many rollouts each prompt gets. Compared, all against the true p (0/1 scale):
  mean@G        GRPO's group mean with G = 4, 8, 16 rollouts
  v05@4         V0.5's fused baseline with k = 4 fixed (k_max = 4: the fusion alone)
  v05           V0.5 with the adaptive budget (k_init = 4, k_max = 16, c = 0.0039)
  mean@spend    what a group mean would reach with the same average spend: E[p (1 - p)] / k_mean (exact)
  corrupt       sigma-prior, but a share of prompts get the far end (1 if p < 0.5 else 0)

    python benchmarks/v05_sim.py                      # the table below
    python benchmarks/v05_sim.py --plot benchmarks/v05_sim.png        # and the plot in docs/v05.md
    python benchmarks/v05_sim.py --rounds     # generate calls per step of 8 prompts: one at a time vs batched
    python benchmarks/v05_sim.py --size       # the test's exact false-rejection rate per k and p (a right prior)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import v05  # noqa: E402


def bernoulli_draw(p, rng):
    """A `draw` for v05.adaptive_rollouts: counts[i] fresh Bernoulli(p_i) rewards for each prompt."""
    return lambda counts: [rng.random(c) < pi for pi, c in zip(p, counts)]


def simulate(n: int = 20000, sigma: float = 0.1, corrupt_frac: float = 0.0, k_init: int = 4, k_max: int = 16,
             cost: float = v05.COST, test: str = "z", seed: int = 0, round_max: int = 1,
             alpha: float = v05.ALPHA) -> dict:
    """One Bernoulli world -> MSEs against the true p, rollouts spent, and where the extra rollouts went."""
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    prior, bad = v05.corrupt_prior(p, v05.noisy_oracle_prior(p, sigma, rng), corrupt_frac, rng)
    res = v05.adaptive_rollouts(bernoulli_draw(p, rng), prior, k_init, k_max, cost, test, alpha, round_max)
    extra = res["k"] - k_init
    out = {"sigma": sigma, "rounds": res["rounds"], "corrupt_frac": corrupt_frac, "k_mean": res["k"].mean(),
           "mse": np.mean((res["mu"] - p) ** 2), "empirical_mse": np.mean((res["hits"] / res["k"] - p) ** 2),
           "mean_at_spend_mse": np.mean(p * (1 - p)) / res["k"].mean(), "prior_mse": np.mean((prior - p) ** 2),
           "reject_rate": res["reject_init"].mean(), "k_max_hit": np.mean(res["k"] >= k_max)}
    if bad.any() and (~bad).any():
        out.update(k_corrupt=res["k"][bad].mean(), k_clean=res["k"][~bad].mean(),
                   extra_share_corrupt=extra[bad].sum() / max(extra.sum(), 1))
    return out


def rounds_per_batch(sigma: float, round_max: int, batch: int = 8, batches: int = 500, seed: int = 0) -> dict:
    """Training's shape: batches of `batch` prompts, each a step; the rounds (generate calls) a step takes and the
    rollouts it spends. Every prompt draws from its own Bernoulli stream, so any round_max sees the same rewards."""
    rng = np.random.default_rng(seed)
    rounds, k = [], []
    for _ in range(batches):
        p = rng.random(batch)
        prior = v05.noisy_oracle_prior(p, sigma, rng)
        streams = [np.random.default_rng(s) for s in rng.integers(1 << 31, size=batch)]
        res = v05.adaptive_rollouts(lambda counts: [g.random(c) < pi for g, pi, c in zip(streams, p, counts)],
                                    prior, round_max=round_max)
        rounds.append(res["rounds"])
        k.append(res["k"].mean())
    return {"rounds": float(np.mean(rounds)), "rounds_max": int(np.max(rounds)), "k_mean": float(np.mean(k))}


def exact_size(k: int, p: float, alpha: float = v05.ALPHA, test: str = "z") -> float:
    """The test's true false-rejection rate at k rollouts when the prior is right (V = p) and rewards are
    Bernoulli(p), by exact enumeration of the success count h: sum over h of Binom(h; k, p) [fuse rejects h of k]."""
    h = np.arange(k + 1)
    reject = v05.fuse(h, np.full(k + 1, k), np.full(k + 1, p), test, alpha)[3]
    return float(stats.binom.pmf(h, k, p)[reject].sum())


def group_mean_mse(n: int, G: int, seed: int = 0) -> float:
    """GRPO's baseline: the mean of G Bernoulli(p) rewards, against p."""
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    return float(np.mean((rng.binomial(G, p) / G - p) ** 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--corrupt-frac", type=float, default=0.25)
    ap.add_argument("--test", default="z", choices=["z", "binomial"])
    ap.add_argument("--round-max", type=int, default=1, help="extra rollouts per prompt per round (v05 --round-max)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="", help="also save MSE against rollouts spent as a PNG here")
    ap.add_argument("--rounds", action="store_true", help="only: generate calls per step of 8 prompts, by --round-max")
    ap.add_argument("--size", action="store_true", help="only: the test's exact size per k and p, at --alpha")
    ap.add_argument("--alpha", type=float, default=v05.ALPHA, help="level of the test (v05 --alpha)")
    a = ap.parse_args()
    if a.size:
        ps, fine = [0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5], np.arange(1, 1000) / 1000
        print(f"--test {a.test} at alpha = {a.alpha:.4f}: exact P(reject | V = p, rewards Bernoulli(p)); "
              "p and 1 - p alike for the z-test")
        print(f"{'k':>3}" + "".join(f"{'p=' + format(p, 'g'):>8}" for p in ps) + f"{'max over p':>12}{'at p':>7}")
        for k in (1, 2, 3, 4, 6, 8, 12, 16):
            size = np.array([exact_size(k, p, a.alpha, a.test) for p in fine])
            print(f"{k:>3}" + "".join(f"{exact_size(k, p, a.alpha, a.test):>8.3f}" for p in ps)
                  + f"{size.max():>12.3f}{fine[size.argmax()]:>7.3f}")
        return
    if a.rounds:
        print("rounds (generate calls) per step of 8 prompts, 500 steps; the same rewards for every round_max")
        print(f"{'prior':<12}{'round_max':>10}{'rounds':>8}{'max':>6}{'rollouts/prompt':>17}")
        for s in a.sigmas:
            for R in (1, 0):
                r = rounds_per_batch(s, R, seed=a.seed)
                print(f"{'sigma=' + format(s, 'g'):<12}{R if R else 'sure':>10}{r['rounds']:>8.2f}{r['rounds_max']:>6}"
                      f"{r['k_mean']:>17.3f}")
        return
    points = {}  # label -> [(rollouts per prompt, MSE)]
    print(f"Bernoulli world: {a.prompts} prompts, p ~ U(0,1), MSE of the baseline against p (0/1 scale)\n")
    print(f"{'baseline':<34}{'rollouts/prompt':>16}{'MSE':>10}")
    for G in (4, 8, 16):
        mse = group_mean_mse(a.prompts, G, a.seed)
        points.setdefault("GRPO group mean, G = 4, 8, 16", []).append((G, mse))
        print(f"{'GRPO group mean, G=' + str(G):<34}{G:>16.2f}{mse:>10.4f}")
    print(f"\n{'prior':<18}{'prior MSE':>10}{'v05@4 MSE':>10}{'v05 k':>8}{'v05 MSE':>10}{'mean@spend':>11}"
          f"{'reject@4':>10}{'k=16':>7}")
    for corrupt in (0.0, a.corrupt_frac):
        for s in a.sigmas:
            fixed = simulate(a.prompts, s, corrupt, k_max=4, test=a.test, seed=a.seed, alpha=a.alpha)
            r = simulate(a.prompts, s, corrupt, test=a.test, seed=a.seed, round_max=a.round_max, alpha=a.alpha)
            name = f"sigma={s:g}" + (f" +{corrupt:.0%} bad" if corrupt else "")
            label = "V0.5, prior noise sigma" + (f", {corrupt:.0%} of priors corrupt" if corrupt else "")
            points.setdefault(label, []).append((r["k_mean"], r["mse"], s))
            print(f"{name:<18}{r['prior_mse']:>10.4f}{fixed['mse']:>10.4f}{r['k_mean']:>8.2f}{r['mse']:>10.4f}"
                  f"{r['mean_at_spend_mse']:>11.4f}{r['reject_rate']:>10.2f}{r['k_max_hit']:>7.2f}")
            if corrupt:
                print(f"{'':<18}  k on corrupted prompts {r['k_corrupt']:.2f}, on the rest {r['k_clean']:.2f}; "
                      f"{r['extra_share_corrupt']:.0%} of the extra rollouts went to the {corrupt:.0%} corrupted")
    if a.plot:
        plot(points, a.plot)


def plot(points: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (label, pts), marker in zip(points.items(), "osD"):
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, marker=marker, label=label)
        for p in pts:
            if len(p) == 3:  # V0.5 points carry their sigma
                ax.annotate(f"{p[2]:g}", (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("rollouts spent per prompt (mean)")
    ax.set_ylabel("MSE of the baseline against the true p")
    ax.set_yscale("log")
    ax.set_title("Bernoulli world, p ~ U(0,1): baseline error per rollout spent", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
