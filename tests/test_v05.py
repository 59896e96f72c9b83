"""v05.py: the fusion weight and the test on hand-computed cases, the z-test equivalence, the budget rule, the
bias of the fused baseline, the Bernoulli-world claims, and the script end to end."""
import functools
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

import v05
from conftest import ROOT, run_script, rolled_back

sys.path.insert(0, str(ROOT / "benchmarks"))
import v05_prior_replay  # noqa: E402
import v05_sim  # noqa: E402
import v05_vs_grpo  # noqa: E402

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
TINY = ["--steps", "2", "--prompts-per-step", "2", "--k-init", "2", "--k-max", "4",
        "--max-new-tokens", "12", "--data", EASY, "--eval-problems", "2", "--seed", "1"]


# ---------------------------------------------------------------- the weight and the test by hand


def test_shrinkage_hand_computed():
    # +-1 scale, k = 4, s2/k = 0.25. v_k = 0.5, V = -0.5: (v - V)^2 = 1, D2 = 0.75, w = 0.75 / 1.0
    w, D2 = v05.shrinkage(0.5, -0.5, 4)
    assert D2 == pytest.approx(0.75) and w == pytest.approx(0.75)
    # v_k = 0.5, V = 0.2: (0.3)^2 = 0.09 <= 0.25 -> H0 kept, D2 = 0, w = 0: the baseline is the prior
    w, D2 = v05.shrinkage(0.5, 0.2, 4)
    assert D2 == 0 and w == 0
    # fuse works on 0/1 counts: 3 of 4 (v_k = 0.5) against p = 0.25 (V = -0.5): mu = 0.75*0.5 + 0.25*(-0.5) = 0.25
    mu, w, D2, reject = v05.fuse([3], [4], [0.25])
    assert mu[0] == pytest.approx((0.25 + 1) / 2) and w[0] == pytest.approx(0.75) and reject[0]
    mu, w, D2, reject = v05.fuse([2], [4], [0.4])  # v_k = 0, V = -0.2: kept, mu = V = p
    assert mu[0] == pytest.approx(0.4) and not reject[0]


def old_rule(hits, k, prior):
    """The positive-part rule as fuse computed it before it ran the z-test: D2 > 0 is the rejection."""
    v, V = 2 * np.asarray(hits, float) / k - 1, 2 * np.asarray(prior, float) - 1
    D2 = np.maximum(0.0, (v - V) ** 2 - 1.0 / np.asarray(k, float))
    w = D2 / (D2 + 1.0 / np.asarray(k, float))
    return (w * v + (1 - w) * V + 1) / 2, w, D2, D2 > 0


def test_training_runs_the_scipy_z_test_which_at_the_default_alpha_is_the_positive_part_bit_for_bit():
    assert v05.ALPHA == pytest.approx(0.3173, abs=1e-4) and v05.z_critical() == 1.0  # exactly: z*^2 s2/k = s2/k
    assert v05.z_critical(0.05) == pytest.approx(1.959964, abs=1e-6)
    k = np.repeat(np.arange(1, 17), 17 * 21)
    hits = np.tile(np.repeat(np.arange(17), 21), 16).astype(float)
    p = np.tile(np.linspace(0, 1, 21), 16 * 17)
    ok = hits <= k  # every attainable v_k on a grid of priors, the ties |z| = 1 included (k = 4, 16: exact)
    rng = np.random.default_rng(0)
    kk = rng.integers(1, 33, 20000)
    cases = [(hits[ok], k[ok], p[ok]), (rng.binomial(kk, 0.5).astype(float), kk, rng.random(20000)),
             ([3.0, 6.0, 1.0], [9, 9, 2], [0.5, 0.5, (1 - 2 ** -0.5) / 2])]  # ties that float rounding breaks
    for h, n, q in cases:  # the default run's decisions and baselines cannot change
        for got, want in zip(v05.fuse(h, n, q), old_rule(h, n, q)):
            assert np.array_equal(got, want)
    # the rule is scipy's two-sided p-value test at alpha, at every level (ties of |z| and z* aside)
    v, V, kk = rng.uniform(-1, 1, 20000), rng.uniform(-1, 1, 20000), rng.integers(1, 33, 20000)
    z = (v - V) / np.sqrt(1.0 / kk)
    for alpha in (0.01, 0.05, 0.2, v05.ALPHA, 0.5):
        clear = np.abs(np.abs(z) - v05.z_critical(alpha)) > 1e-9
        rej = v05.z_test_rejects(v, V, kk, alpha=alpha)
        assert np.array_equal(rej[clear], (2 * stats.norm.sf(np.abs(z)) < alpha)[clear]), alpha
        hits01 = (v + 1) / 2 * kk  # the same v_k as 0/1 counts
        mu, w, D2, reject = v05.fuse(hits01, kk, (V + 1) / 2, alpha=alpha)
        assert np.array_equal(reject, D2 > 0) and np.array_equal(reject[clear], rej[clear]), alpha


def test_alpha_changes_the_test_and_the_baseline_by_hand():
    # k = 4 (s2/k = 1/4), +-1 scale. z*(0.05)^2 = 3.8415, z*(0.5)^2 = 0.4549
    # 3 of 4 (v = 0.5) against p = 0.375 (V = -0.25): (v - V)^2 = 0.5625 > 0.25 rejects at the default level,
    # but not at 0.05 (0.5625 < 0.9604): the baseline is the prior
    mu, w, D2, reject = v05.fuse([3, 3], [4, 4], [0.375, 0.375])
    assert reject[0] and D2[0] == pytest.approx(0.3125) and w[0] == pytest.approx(0.3125 / 0.5625)
    mu, w, D2, reject = v05.fuse([3], [4], [0.375], alpha=0.05)
    assert not reject[0] and mu[0] == 0.375
    # 2 of 4 (v = 0) against p = 0.3 (V = -0.4): 0.16 < 0.25 keeps H0 at the default level, rejects at 0.5 with
    # D2 = 0.16 - 0.4549 / 4 = 0.04627, w = D2 / (D2 + 1/4)
    assert not v05.fuse([2], [4], [0.3])[3][0]
    mu, w, D2, reject = v05.fuse([2], [4], [0.3], alpha=0.5)
    z2 = stats.norm.isf(0.25) ** 2
    assert reject[0] and D2[0] == pytest.approx(0.16 - z2 / 4) and w[0] == pytest.approx(D2[0] / (D2[0] + 0.25))
    assert mu[0] == pytest.approx((1 - 0.4 * (1 - w[0])) / 2)  # (w v_k + (1 - w) V + 1) / 2 with v_k = 0
    # and through the budget: 16 draws of the same pools, fewer rejections at k_init at a stricter level
    rng = np.random.default_rng(3)
    pool, prior = rng.random((2000, 16)) < rng.random(2000)[:, None], rng.random(2000)
    res = {a: v05.adaptive_rollouts(pool_draw(pool), prior, alpha=a) for a in (0.05, v05.ALPHA)}
    assert res[0.05]["reject_init"].sum() < 0.6 * res[v05.ALPHA]["reject_init"].sum()  # seeded: 633 vs 1206
    assert res[0.05]["k"].mean() < res[v05.ALPHA]["k"].mean() - 0.5
    assert not (res[0.05]["reject_init"] & ~res[v05.ALPHA]["reject_init"]).any()  # nested rejection regions


def test_exact_size_of_the_test_under_bernoulli_rewards_by_hand():
    """alpha = 0.317 is the level for Gaussian rewards; with 0/1 rewards and a right prior the size is not alpha."""
    size = v05_sim.exact_size
    assert size(4, 0.5) == pytest.approx(2 / 16)  # V = 0: only 0 or 4 of 4 (|v| = 1 > 1/2); 1 or 3 of 4 tie at 1/2
    assert size(4, 0.25) == pytest.approx(4 * 0.25 ** 3 * 0.75 + 0.25 ** 4)  # V = -1/2: 3, 4 of 4 (0 of 4 ties)
    assert size(4, 0.3) == pytest.approx(0.7 ** 4 + 4 * 0.3 ** 3 * 0.7 + 0.3 ** 4)  # V = -0.4: 0, 3, 4 of 4
    pmf = stats.binom.pmf
    assert size(8, 0.552) == pytest.approx(1 - pmf(4, 8, 0.552) - pmf(5, 8, 0.552))  # V = .104: only 4, 5 kept
    assert size(8, 0.552) > 0.47  # near the worst case at k = 8
    assert size(16, 0.5) == pytest.approx(2 * stats.binom.cdf(5, 16, 0.5))  # |v| > 1/4: h <= 5 or h >= 11
    assert size(16, 0.5, alpha=0.05) == pytest.approx(2 * stats.binom.cdf(4, 16, 0.5))  # |v| > 0.49
    assert size(4, 0.05) < 0.02 and size(1, 0.5) == 0.0
    assert max(size(8, p, test="binomial") for p in np.arange(1, 100) / 100) <= v05.ALPHA  # binomtest is exact


def test_zero_one_and_plus_minus_one_scales_give_the_same_decisions():
    rng = np.random.default_rng(1)
    k = rng.integers(1, 17, 3000)
    v01, p01 = rng.binomial(k, 0.5) / k, rng.random(3000)
    w_pm, D2_pm = v05.shrinkage(2 * v01 - 1, 2 * p01 - 1, k, s2=1.0)
    w_01, D2_01 = v05.shrinkage(v01, p01, k, s2=0.25)
    np.testing.assert_allclose(w_01, w_pm, atol=1e-12)
    np.testing.assert_allclose(D2_01, D2_pm / 4, atol=1e-12)
    assert np.array_equal(v05.z_test_rejects(v01, p01, k, s2=0.25), v05.z_test_rejects(2 * v01 - 1, 2 * p01 - 1, k))
    # the budget's c is stated on the +-1 scale; on 0/1 it is c/4
    assert np.array_equal(v05.wants_more(D2_01, k, 0.0039 / 4, s2=0.25), v05.wants_more(D2_pm, k, 0.0039))
    mu01 = w_01 * v01 + (1 - w_01) * p01
    np.testing.assert_allclose(v05.fuse(v01 * k, k, p01)[0], mu01, atol=1e-12)


def test_binomial_test_matches_scipy_and_gates_the_fusion():
    assert v05.binomial_rejects([4], [4], [0.2])[0]  # P(4 of 4 | 0.2) = 0.0016
    assert not v05.binomial_rejects([1], [4], [0.25])[0]
    hits, k, p = [0, 1, 2, 3, 4, 7], [4, 4, 4, 4, 4, 8], [0.1, 0.5, 0.5, 0.2, 0.9, 0.3]
    want = [stats.binomtest(h, n, q).pvalue < v05.ALPHA for h, n, q in zip(hits, k, p)]
    assert list(v05.binomial_rejects(hits, k, p)) == want
    mu, w, D2, reject = v05.fuse(hits, k, p, test="binomial")
    assert np.array_equal(reject, want)
    np.testing.assert_allclose(mu[~reject], np.array(p)[~reject])  # kept: the baseline is the prior
    assert (w[reject] > 0).all()
    # 2 of 4 against p = 0.2: p-value P(2) + P(3) + P(4) = 0.1536 + 0.0256 + 0.0016 = 0.1808, rejected at 0.317 (not
    # at 0.18); the plug-in D2 = (v - V)^2 = (0 + 0.6)^2 = 0.36, w = 0.36 / (0.36 + 1/4)
    mu, w, D2, reject = v05.fuse([2], [4], [0.2], test="binomial")
    assert reject[0] and D2[0] == pytest.approx(0.36) and w[0] == pytest.approx(0.36 / 0.61)
    assert mu[0] == pytest.approx((1 - 0.6 * (1 - 0.36 / 0.61)) / 2)
    assert not v05.binomial_rejects([2], [4], [0.2], alpha=0.18)[0]
    with pytest.raises(ValueError, match="test"):
        v05.fuse(hits, k, p, test="t")


# ---------------------------------------------------------------- the budget


def pool_draw(pool):
    """Prompt i's rewards are row i of pool, drawn in order: any rule sees the same rewards."""
    taken = np.zeros(len(pool), dtype=int)

    def draw(counts):
        out = [pool[i][taken[i]:taken[i] + c] for i, c in enumerate(counts)]
        taken[:] += counts
        return out
    return draw


def fixed_draw(rate):
    """Deterministic rewards: prompt i returns 1 for a share rate[i] of its rollouts, in a fixed pattern."""
    seen = np.zeros(len(rate))

    def draw(counts):
        out = []
        for i, c in enumerate(counts):
            out.append([float(int((seen[i] + j + 1) * rate[i]) > int((seen[i] + j) * rate[i])) for j in range(c)])
            seen[i] += c
        return out
    return draw


def test_budget_stops_at_k_init_when_the_prior_agrees_and_grows_when_it_does_not():
    # prompt 0: half right, prior 0.5 -> v_k = V, H0 kept, stop at 4. prompt 1: always right, prior 0 -> k_max.
    # prompt 2: 1 in 4 right, prior 0.75 -> rejected at 4 (z = -2), grows.
    res = v05.adaptive_rollouts(fixed_draw([0.5, 1.0, 0.25]), [0.5, 0.0, 0.75], k_init=4, k_max=16)
    assert res["k"][0] == 4 and res["k"][1] == 16 and res["k"][2] > 4
    assert list(res["reject_init"]) == [False, True, True]
    assert res["mu"][0] == pytest.approx(0.5)
    assert res["mu"][1] > 0.95  # w -> 1: the baseline follows the rollouts, not the wrong prior
    # the look-ahead by hand: D2 = 0 -> no gain; a large D2 at k = 4 gains ~ 1/4 - 1/5 > c
    assert not v05.wants_more(0.0, 4)[()] and v05.wants_more(3.75, 4)[()]
    assert not v05.wants_more(3.75, 16)[()]  # k_max
    # where the gain D2^2 / ((k D2 + 1)((k+1) D2 + 1)) (s2 = 1) < c it stops below k_max
    assert not v05.wants_more(0.02, 4)[()]
    # the gain is below 1 / (k (k+1)) (D2 -> inf), so at c = 0.0039 the cost alone stops every prompt by k = 16:
    # k_max binds below 16 only
    assert v05.wants_more(3.75, 7, k_max=8)[()] and not v05.wants_more(3.75, 8, k_max=8)[()]
    assert v05.adaptive_rollouts(fixed_draw([1.0]), [0.0], k_max=8)["k"].tolist() == [8]
    assert not v05.wants_more(1e9, 16, k_max=99)[()] and v05.wants_more(1e9, 15, k_max=99)[()]
    # reject_init is the test at k_init, reject the last one: 4 of 4 against 0.5 rejects, 4 of 6 keeps H0 (mu = V)
    res = v05.adaptive_rollouts(pool_draw([[1, 1, 1, 1, 0, 0, 0, 0]]), [0.5])
    assert res["k"].tolist() == [6] and res["reject_init"].tolist() == [True] and res["reject"].tolist() == [False]
    assert res["mu"].tolist() == [0.5]
    seq = v05.adaptive_rollouts(fixed_draw([0.5, 1.0, 0.25]), [0.5, 0.0, 0.75], round_max=1)
    batched = v05.adaptive_rollouts(fixed_draw([0.5, 1.0, 0.25]), [0.5, 0.0, 0.75])
    assert seq["rounds"] > batched["rounds"] and list(batched["k"]) == list(seq["k"])
    with pytest.raises(ValueError, match="k_init"):
        v05.adaptive_rollouts(fixed_draw([0.5]), [0.5], k_init=0)


def test_risk_and_the_cost_c_by_hand():
    # MSE(4) at D2 = 0.75: 0.75 * 0.25 / (0.75 + 0.25) = 0.1875; R(k) = MSE(k) + c k with c = 0.0039
    assert v05.mse(0.75, 4) == pytest.approx(0.1875) and v05.mse(0.0, 4) == 0
    assert v05.risk(0.75, 4) == pytest.approx(0.1875 + 4 * 0.0039) and v05.COST == v05.Args().cost == 0.0039
    assert v05.mse(0.75 / 4, 4, s2=0.25) == pytest.approx(0.1875 / 4)  # the 0/1 scale: a quarter
    # the gain from k = 4 to 5: D2 = 0.05 -> 0.0025 / (1.2 * 1.25) = 0.00167; D2 = 0.1 -> 0.01 / (1.4 * 1.5) = 0.00476:
    # c = 0.0039 buys the second rollout only (c = 0.0005 would buy both, c = 0.005 neither)
    assert v05.mse(0.05, 4) - v05.mse(0.05, 5) == pytest.approx(0.0025 / 1.5)
    assert v05.wants_more([0.05, 0.1], 4).tolist() == [False, True]
    # the same through the budget: 4 of 4 right against p = 0.726 (D2 ~ 0.050) stops at 4; a lower c buys more
    all_right = lambda counts: [[1.0] * c for c in counts]  # noqa: E731
    assert v05.adaptive_rollouts(all_right, [0.726])["k"].tolist() == [4]
    assert v05.adaptive_rollouts(all_right, [0.726], cost=0.0005)["k"][0] > 4
    # wants_more is R(k+1) < R(k) (ties aside)
    rng = np.random.default_rng(0)
    D2, k = rng.uniform(0, 2, 5000), rng.integers(1, 16, 5000)
    drop = v05.risk(D2, k) - v05.risk(D2, k + 1)
    clear = np.abs(drop) > 1e-12
    assert np.array_equal(v05.wants_more(D2, k)[clear], (drop > 0)[clear])


def test_sure_extra_by_hand_and_against_every_path():
    # 4 of 4 right, prior 0.5 (+-1: v = 1, V = 0, D2 = 1 - 1/4): one more is bought whatever it returns (a miss:
    # v = 0.6, D2 = 0.36 - 0.2 = 0.16, gain 0.0073 > c); after 4/6 (v = 1/3, (v - V)^2 = 1/9 < 1/6) the test keeps
    # H0 and the rule stops, so only 2 are sure. H0 kept (2 of 4 at prior 0.5): none.
    assert v05.sure_extra([4, 2], [4, 4], [0.5, 0.5]).tolist() == [2, 0]

    @functools.cache
    def min_stop(h, k, prior):  # the fewest rollouts the one-at-a-time rule buys over all reward paths
        if not v05.wants_more(v05.fuse([h], [k], [prior])[2], [k])[0]:
            return 0
        return 1 + min(min_stop(h, k + 1, prior), min_stop(h + 1, k + 1, prior))
    for prior in (0.0, 0.1, 0.3, 0.5, 0.75, 1.0):
        states = [(h, k) for k in range(1, 17) for h in range(k + 1)]
        got = v05.sure_extra([h for h, _ in states], [k for _, k in states], np.full(len(states), prior))
        assert got.tolist() == [min_stop(h, k, prior) for h, k in states], prior


def test_batched_rounds_make_the_paper_one_at_a_time_decisions():
    """Each prompt draws its rewards from its own fixed sequence, so one-at-a-time (round_max = 1) and the batched
    rounds must agree prompt for prompt: same k, hits and baseline, in fewer generate calls."""
    rng = np.random.default_rng(0)
    p, prior = rng.random(3000), rng.random(3000)
    pool = rng.random((3000, 16)) < p[:, None]
    seq = v05.adaptive_rollouts(pool_draw(pool), prior, round_max=1)
    batched = v05.adaptive_rollouts(pool_draw(pool), prior)
    for key in ("k", "hits", "mu", "reject_init", "reject"):
        assert np.array_equal(seq[key], batched[key]), key
    assert seq["k"].max() == 16 and batched["rounds"] < seq["rounds"], (batched["rounds"], seq["rounds"])


def test_the_prior_can_read_the_k_init_rates():
    """prior as a function: called once, after k_init rollouts each, with their success rates."""
    calls = []

    class Draw:
        def __len__(self):
            return 2

        def __call__(self, counts):
            return [[1.0] * c for c in counts]
    res = v05.adaptive_rollouts(Draw(), lambda rates: calls.append(rates.copy()) or np.array([1.0, 0.0]))
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 1.0]
    assert res["prior"].tolist() == [1.0, 0.0] and res["k"].tolist() == [4, 16]
    with pytest.raises(ValueError, match="len"):
        v05.adaptive_rollouts(lambda counts: [[1.0] * c for c in counts], lambda rates: rates)


def test_bias_of_the_fused_baseline_shrinks_with_k():
    """mu uses w estimated from the same rollouts, so E[mu] != p (the paper: O(1/sqrt(k))). p = 0.3, a prior
    wrong by 0.2: the bias must fall as k grows. 200k draws per k: SE of each mean < 0.001."""
    rng = np.random.default_rng(0)
    p, V, n = 0.3, 0.5, 200_000
    bias = []
    for k in (4, 8, 16, 64):
        hits = rng.binomial(k, p, n)
        bias.append(v05.fuse(hits, np.full(n, k), np.full(n, V))[0].mean() - p)
    assert all(b > 0 for b in bias), bias  # pulled towards the prior
    assert all(a > b + 0.005 for a, b in zip(bias, bias[1:])), bias
    assert bias[-1] < bias[0] / 3, bias


def test_ablation_priors():
    rng = np.random.default_rng(0)
    p = np.full(20000, 0.5)
    noisy = v05.noisy_oracle_prior(p, 0.1, rng)
    assert abs(noisy.std() - 0.1) < 0.003 and abs(noisy.mean() - 0.5) < 0.003  # SE ~ 0.0007
    assert v05.noisy_oracle_prior([0.0, 1.0], 0.0, rng).tolist() == [0.0, 1.0]
    assert (v05.noisy_oracle_prior(np.zeros(1000), 0.3, rng) >= 0).all()  # clipped to [0, 1]
    assert (v05.noisy_oracle_prior(np.ones(1000), 0.3, rng) <= 1).all()
    V, bad = v05.corrupt_prior([0.2, 0.8, 0.5], [0.3, 0.7, 0.4], 1.0, rng)  # all corrupted: the far end
    assert V.tolist() == [1.0, 0.0, 0.0] and bad.all()
    V, bad = v05.corrupt_prior([0.2, 0.8, 0.5], [0.3, 0.7, 0.4], 0.0, rng)
    assert V.tolist() == [0.3, 0.7, 0.4] and not bad.any()
    assert abs(v05.corrupt_prior(p, p, 0.25, rng)[1].mean() - 0.25) < 0.015  # SE 0.003


def test_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    mu = torch.tensor([0.5, 0.9])
    # the paper's +-1 scale: (2r - 1) - (2mu - 1), twice the 0/1 difference
    torch.testing.assert_close(v05.v05_advantages(r, g, mu), torch.tensor([1.0, -1.0, 1.0, 0.2, 0.2]))
    a = v05.v05_advantages(r, g, mu, scale_std=True)
    torch.testing.assert_close(a, torch.tensor([1.0, -1.0, 1.0, 0.1 / 0.3, 0.1 / 0.3]))
    # the std floor: mu = 0.999 -> 2 * 0.001 / (2 * max(0.0316, 0.1)) = 0.01
    torch.testing.assert_close(v05.v05_advantages(torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.999]),
                                                  True), torch.tensor([0.01]))
    # an all-correct group still gets a signal when the baseline is below 1 (GRPO's would be 0)
    assert (v05.v05_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), torch.tensor([0.99]), True) > 0).all()


# ---------------------------------------------------------------- the Bernoulli world (benchmarks/v05_sim.py)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.1, 0.2])
def test_fusion_at_k4_beats_the_4_rollout_mean_with_a_decent_prior(sigma):
    fixed = v05_sim.simulate(4000, sigma, k_max=4, seed=0)
    mean4 = v05_sim.group_mean_mse(4000, 4, seed=0)
    assert fixed["mse"] < 0.75 * mean4, (fixed["mse"], mean4)  # measured: 0.011-0.027 vs 0.042


def test_corrupt_prior_gets_the_extra_rollouts_and_mse_stays_near_the_empirical_mean():
    r = v05_sim.simulate(4000, 0.1, corrupt_frac=0.25, seed=0)
    assert r["k_corrupt"] > 12 and r["k_clean"] < 5.5, r  # measured: 14.5 vs 4.8
    assert r["extra_share_corrupt"] > 0.7, r  # 25% of the prompts get > 70% of the extra rollouts (measured 0.82)
    assert r["mse"] < 1.1 * r["mean_at_spend_mse"], r  # measured 0.018 vs 0.023


def test_adaptive_budget_spends_little_when_the_prior_is_good():
    r = v05_sim.simulate(4000, 0.05, seed=0)
    assert r["k_mean"] < 5 and r["mse"] < v05_sim.group_mean_mse(4000, 16, seed=0)  # 4.5 rollouts beat 16


# ---------------------------------------------------------------- the script


def run(*argv, check=True):
    return run_script("v05.py", *argv, check=check)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_warmup_prompts_are_disjoint_from_the_training_prompts_grpo_also_gets():
    probs = v05.C.arith_problems("train", 50)
    warm = v05.warmup_problems(probs, 3, 8)
    first = v05.C.ProblemStream(probs, 3).take(42)  # what grpo.py's steps take first at seed 3
    assert len(warm) == 8 and len({p.id for p in warm}) == 8
    assert not {p.id for p in warm} & {p.id for p in first}
    assert len(v05.warmup_problems(probs, 3, 80)) == 50  # asking for more than there are: all of them


@pytest.fixture(scope="module")
def shipped_v0():
    return v05.V0.load_v0(v05.V0_DEFAULT)


@pytest.mark.slow
def test_fresh_context_leaves_the_prompt_itself_out(shipped_v0):
    """V0 reads the step's other prompts' k_init rates, never a prompt's own (the test compares V with them)."""
    model, bb = shipped_v0
    hist = [("What is 2 + 3?", 0.75), ("What is 47 times 8 minus 3?", 0.0)]
    qs = ["What is 4 + 4?", "What is 93 + 58?", "Each box holds 7 shells. How many shells are in 18 boxes?"]
    a = v05.prior_from_v0(model, bb, hist, qs, np.array([1.0, 0.0, 0.25]))
    b = v05.prior_from_v0(model, bb, hist, qs, np.array([0.0, 0.0, 0.25]))  # only prompt 0's own rate changed
    assert a[0] == pytest.approx(b[0], abs=1e-6) and abs(a[1] - b[1]) > 1e-4  # prompt 1 reads prompt 0's rate
    alone = v05.prior_from_v0(model, bb, hist + [(qs[1], 0.0), (qs[2], 0.25)], qs[:1])[0]
    assert a[0] == pytest.approx(alone, abs=1e-5)  # = V0 on history + the other two rows
    assert v05.prior_from_v0(model, bb, hist, qs).shape == (3,)  # --no-fresh-context: the history alone
    assert v05.prior_from_v0(model, bb, [], qs[:1], np.array([1.0]), fallback=0.3).tolist() == [0.3]  # no context


def test_history_starts_from_the_rows_v0_carries_of_this_policy():
    """--history-init auto: the shipped V0's own rows of the base policy at the training temperature, nothing else."""
    rows = v05.V0.initial_history(v05.V0_DEFAULT, "auto", 16, "smollm2-135m@T0.7")
    assert len(rows) == 16 and all(isinstance(q, str) and 0 <= r <= 1 for q, r in rows)
    assert rows == v05.V0.initial_history(v05.V0_DEFAULT, "auto", 128, "smollm2-135m@T0.7")[-16:]  # the newest
    assert v05.V0.initial_history(v05.V0_DEFAULT, "auto", 16, "smollm2-135m@T1") == []  # another temperature
    assert v05.V0.initial_history(v05.V0_DEFAULT, "none", 16) == []
    with pytest.raises(SystemExit, match="--history-init runs/nope.jsonl"):
        v05.V0.initial_history(v05.V0_DEFAULT, "runs/nope.jsonl", 16)


def test_the_default_policy_gets_the_arith_v0_and_its_own_rows():
    init = v05.v0_start(v05.Args())
    assert v05.v0_checkpoint(v05.Args()) == init["ckpt"] == v05.V0_DEFAULT
    assert init["history"] == v05.V0.initial_history(v05.V0_DEFAULT, "auto", 16, "smollm2-135m@T0.7")
    assert len(init["history"]) == 16 and init["fresh_context"] and init["warning"] is None
    assert v05.V0_DEFAULT in init["line"] and "16 of its rows of smollm2-135m@T0.7" in init["line"]
    init = v05.v0_start(v05.Args(temperature=0.5, fresh_context=False))  # no rows at this temperature
    assert init["ckpt"] == v05.V0_DEFAULT and init["history"] == [] and init["fresh_context"]
    assert not v05.v0_start(v05.Args(fresh_context=False))["fresh_context"]  # a history: the flag holds


def test_qwen3_4b_gets_the_generalist_and_the_authors_step_16_rows_of_it():
    want = v05.V0.initial_history(v05.V0_GENERALIST, "auto", 16, "Qwen3-4B-Instruct", 16)
    assert len(want) == 16
    for model in ["Qwen3-4B", "Qwen/Qwen3-4B-Instruct-2507", "/models/qwen3-4b-instruct-2507/"]:
        init = v05.v0_start(v05.Args(model=model))
        assert init["ckpt"] == v05.V0_GENERALIST and init["history"] == want, model
        assert init["warning"] is None and "Qwen3-4B-Instruct (step 16)" in init["line"]
    init = v05.v0_start(v05.Args(model="R1-Distill-1.5B", history=600))  # all 512 of its step-16 rows
    assert init["history"] == v05.V0.initial_history(v05.V0_GENERALIST, "auto", 600, "DeepSeek-R1-Distill-Qwen-1.5B")
    assert len(init["history"]) == 512 and init["warning"] is None
    names = {"Qwen3-4B-Instruct", "DeepSeek-R1-Distill-Qwen-1.5B"}
    assert v05.rows_name("Qwen/Qwen3-4B", names) is None  # the base model is not the instruct one the rows are of
    assert v05.rows_name("Qwen3-0.6B", names) is None and v05.rows_name("smollm2-135m", names) is None
    init = v05.v0_start(v05.Args(model="Qwen3-0.6B"))  # the family, not the model: no rows, no warning
    assert init["ckpt"] == v05.V0_GENERALIST and init["history"] == [] and init["warning"] is None


def test_a_folder_no_v0_was_made_for_gets_the_generalist_an_empty_history_fresh_context_and_a_warning(tmp_path):
    other = tmp_path / "other-policy"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    init = v05.v0_start(v05.Args(model=str(other), fresh_context=False))
    assert init["ckpt"] == v05.V0_GENERALIST and init["history"] == [] and init["fresh_context"]
    assert "no rows" in init["line"] and "this step's k_init rates" in init["line"]
    assert "never saw" in init["warning"] and "Qwen3-4B-Instruct" in init["warning"]
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3"}))  # a Qwen3 of its own: no warning
    assert v05.v0_start(v05.Args(model=str(other)))["warning"] is None
    assert v05.v0_start(v05.Args(v0=v05.V0_GENERALIST))["warning"]  # smollm2 on the generalist, by --v0


def test_an_explicit_v0_that_is_not_one_fails_naming_the_flag(tmp_path):
    for v0 in ["runs/nope", str(tmp_path)]:
        with pytest.raises(SystemExit, match=f"--v0 {v0}: not a V0 checkpoint"):
            v05.v0_checkpoint(v05.Args(model="Qwen3-4B", v0=v0))
    assert v05.v0_checkpoint(v05.Args(model="Qwen3-4B", v0=v05.V0_DEFAULT)) == v05.V0_DEFAULT


def test_the_generalist_ships_the_authors_step_16_rows_and_only_their_prompts():
    """pretrained/v0-generalist stands alone: weights, config, and the V0 authors' context rows of GRPO step 16 with
    exactly the prompts they reference (those of ../shared/data/v0, where it is present)."""
    ck = ROOT / v05.V0_GENERALIST
    assert sum(f.stat().st_size for f in ck.iterdir()) < 4 * 2**20  # a few MB
    prompts = v05.V0.read_prompts(ck / "prompt_dict.json")
    rows = v05.V0.read_rows(ck / "context.jsonl", prompts)
    assert {(r["model"], r["step"], r["type"]) for r in rows} == {
        ("Qwen3-4B-Instruct", 16, "context"), ("DeepSeek-R1-Distill-Qwen-1.5B", 16, "context")}
    assert set(prompts) == {v05.V0.prompt_key(r) for r in rows}
    shared = ROOT.parent / "shared" / "data" / "v0"
    if shared.exists():
        theirs = v05.V0.read_rows(shared / "context.jsonl")
        assert rows == [r for r in theirs if r["step"] == 16]
        all_prompts = v05.V0.read_prompts(shared / "prompt_dict.json")
        assert all(all_prompts[k] == v for k, v in prompts.items())


def test_flags_that_make_no_sense_are_rejected_naming_the_flag(capsys):
    for argv, name in [(["--prior", "corrupt"], "--oracle-k"), (["--alpha", "1.5"], "--alpha"),
                       (["--k-init", "5", "--k-max", "4"], "--k-init"), (["--kl-coef", "0.1"], "--kl-coef"),
                       (["--cost", "-1"], "--cost"), (["--history", "0"], "--history"),
                       (["--corrupt-frac", "2"], "--corrupt-frac"), (["--round-max", "-1"], "--round-max")]:
        with pytest.raises(SystemExit) as e:
            v05.C.parse_args(v05.Args, argv)
        assert e.value.code == 2 and f"{name} must be" in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="--oracle-k must be > 0 for --prior oracle"):
        v05.Args(prior="oracle")
    assert v05.Args(prior="oracle", oracle_k=16).oracle_k == 16


@pytest.fixture(scope="module")
def v05_run(module_dir):
    out = module_dir("v05")
    run(*TINY, "--oracle-k", "2", "--save-every", "1", "--keep-checkpoints", "2", "--out", str(out))
    return out


def replay(logged, k_init, k_max, test="z"):
    """Re-run the budget on a step's logged rewards (in draw order) and priors: what the rule would have done."""
    return v05.adaptive_rollouts(pool_draw([y["rewards"] for y in logged]), np.array([y["prior"] for y in logged]),
                                 k_init, k_max, test=test)


@pytest.mark.slow
def test_two_steps_log_the_v05_metrics(v05_run, shipped_v0):
    r = rows(v05_run)
    assert [x["step"] for x in r] == [0, 1, 2]
    assert r[0].get("rollouts") is None  # no warm-up by default: the history starts from V0's own rows
    for x in r[1:]:
        for key in ("k_mean", "k_max_hit", "test_reject_rate", "w_mean", "prior_mse", "fused_mse", "empirical_mse",
                    "baseline_mse", "rollouts", "acc", "grad_norm"):
            assert x[key] is not None, key
    # OUT/prompts.jsonl: every prompt's rewards in draw order, as many as the step's rollouts
    p = [json.loads(line) for line in (v05_run / "prompts.jsonl").read_text().splitlines()]
    assert [y["step"] for y in p] == [1, 1, 2, 2]
    assert all(set(y) >= {"question", "answer", "prior", "mu", "reject_init"} for y in p if y["step"] > 0)
    # each step spent what the rule buys on those rewards, and its baselines and tests are the rule's
    history = v05.V0.initial_history(v05.V0_DEFAULT, "auto", 16, "smollm2-135m@T0.7")
    assert len(history) == 16
    for x in r[1:]:
        step = [y for y in p if y["step"] == x["step"]]
        res = replay(step, 2, 4)
        assert res["k"].tolist() == [len(y["rewards"]) for y in step] and x["rollouts"] == res["k"].sum()
        assert x["k_mean"] == res["k"].mean() and x["test_reject_rate"] == res["reject_init"].mean()
        np.testing.assert_allclose(res["mu"], [y["mu"] for y in step], rtol=0, atol=1e-12)
        assert res["reject_init"].tolist() == [y["reject_init"] for y in step]
        # V0 read the history FIFO (16 rows of the base policy, then each step's rates) and the other prompt's
        # k_init rate, never the prompt's own
        init = [np.mean(y["rewards"][:2]) for y in step]
        want = v05.prior_from_v0(*shipped_v0, history, [y["question"] for y in step], np.array(init))
        np.testing.assert_allclose([y["prior"] for y in step], want, atol=1e-5)
        history = (history + [(y["question"], float(np.mean(y["rewards"]))) for y in step])[-16:]
    # the training steps take the prompts grpo.py takes at this seed
    grpo_prompts = v05.C.ProblemStream(v05.C.load_problems(EASY), 1).take(4)
    assert [y["question"] for y in p if y["step"] > 0] == [q.question for q in grpo_prompts]


@pytest.mark.slow
def test_resume_continues_exactly(v05_run, tmp_path):
    """The 2-step run as a crash right after step 1 leaves it, resumed: the same metrics, prompts and weights as in one
    go (weights, optimizer, data cursor and V0's history come back)."""
    cut = rolled_back(v05_run, 1, tmp_path / "cut")
    run(*TINY, "--oracle-k", "2", "--resume", "--out", str(cut))
    a, b = rows(v05_run), rows(cut)
    assert [x["step"] for x in b] == [0, 1, 2]
    volatile = {"time_gen", "time_train", "time_step", "time_prior", "peak_mem_gb"}
    keys = lambda x: {k: v for k, v in x.items() if k not in volatile}  # noqa: E731
    assert [keys(x) for x in a] == [keys(x) for x in b]
    assert (v05_run / "prompts.jsonl").read_text() == (cut / "prompts.jsonl").read_text()
    wa, wb = (load_file(o / "ckpt" / "policy" / "model.safetensors") for o in (v05_run, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_policy_no_v0_was_made_for_runs_on_the_generalist(tmp_path):
    """--model a folder (the embedded model under another name): the generalist V0, an empty history, a warning, and
    at step 1 each prompt's prior is V0 on the other prompt's k_init rate alone."""
    other = tmp_path / "other-policy"
    other.mkdir()
    for f in v05.C.embedded_model_folder().iterdir():
        (other / f.name).symlink_to(f)
    out = tmp_path / "run"
    p = run("--model", str(other), *TINY[:1], "1", *TINY[2:12], "--eval-problems", "0", "--seed", "1",
            "--out", str(out))
    assert f"V0 {v05.V0_GENERALIST}" in p.stdout and "no rows" in p.stdout and "v05: warning: V0 never saw" in p.stdout
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1]
    for key in ("k_mean", "test_reject_rate", "w_mean", "prior_mean", "rollouts", "acc", "grad_norm"):
        assert r[1][key] is not None, key
    step = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    init = np.array([np.mean(y["rewards"][:2]) for y in step])
    want = v05.prior_from_v0(*v05.V0.load_v0(v05.V0_GENERALIST), [], [y["question"] for y in step], init)
    np.testing.assert_allclose([y["prior"] for y in step], want, atol=1e-5)


@pytest.mark.slow
def test_corrupt_prior_runs_and_reports_where_it_spent(tmp_path):
    run(*TINY[:1], "1", *TINY[2:], "--prior", "corrupt", "--corrupt-frac", "0.5", "--oracle-k", "2",
        "--test", "binomial", "--out", str(tmp_path))
    x = rows(tmp_path)[-1]
    p = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    res = replay(p, 2, 4, test="binomial")  # the binomial test decided, on the corrupted priors
    assert res["k"].tolist() == [len(y["rewards"]) for y in p] and x["k_mean"] == res["k"].mean()
    assert res["reject_init"].tolist() == [y["reject_init"] for y in p]
    np.testing.assert_allclose(res["mu"], [y["mu"] for y in p], rtol=0, atol=1e-12)
    assert x["prior_mse"] is not None


@pytest.mark.slow
def test_prior_replay_scores_predictors_on_a_run(tmp_path, capsys):
    """benchmarks/v05_prior_replay.py on a made-up run where the success rate is set by the template level:
    the predictor told the level must beat the context mean by far, V0 shifted to each step's mean rate has no
    mean error, and a bad row names its line."""
    probs = v05.C.arith_problems("train")
    easy, hard = [p for p in probs if p.level == 1][:12], [p for p in probs if p.level == 10][:12]
    rows = [{"step": s, "question": p.question, "answer": p.answer, "rewards": [int(p.level == 1)] * 4,
             **({"prior": 0.5} if s else {})}  # as if the run's prior had been the context mean (0.5 at both steps)
            for s in range(3) for p in easy[4 * s:4 * s + 4] + hard[4 * s:4 * s + 4]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    v05_prior_replay.main([str(path), "--history", "16", "--history-init", "none", "--only", "context mean,level mean,knn,v0 oracle shift"])
    res = {line.split("\t")[1].strip(): dict(kv.split("=") for kv in line.split("\t")[2].split())
           for line in capsys.readouterr().out.splitlines()}
    assert set(res) == {"context mean", "level mean", "knn", "v0 oracle shift"}
    assert abs(float(res["v0 oracle shift"]["prior_bias"])) < 1e-3  # shifted to each step's mean final rate
    assert float(res["context mean"]["prior_mse"]) == pytest.approx(0.25)  # half the rows 1, half 0
    assert float(res["context mean"]["max_gap_to_logged_prior"]) == 0.0  # it recomputes the logged priors
    assert float(res["level mean"]["max_gap_to_logged_prior"]) > 0.3
    assert float(res["level mean"]["prior_mse"]) < 0.05  # (4 + 1) / 6 against 1, 1 / 6 against 0
    assert float(res["level mean"]["simulated_k_mean"]) < float(res["context mean"]["simulated_k_mean"])
    # a run without a warm-up (v05's default): step 1 reads no history; V0 has this step's other rows
    (tmp_path / "nowarm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] > 0))
    v05_prior_replay.main([str(tmp_path / "nowarm.jsonl"), "--history", "16", "--history-init", "none", "--only", "v0,context mean"])
    res = {line.split("\t")[1].strip(): dict(kv.split("=") for kv in line.split("\t")[2].split())
           for line in capsys.readouterr().out.splitlines()}
    assert list(res) == ["v0", "context mean"]
    assert float(res["context mean"]["prior_mse"]) == pytest.approx(0.25)  # 0.5 at step 1 (fallback) and step 2
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"prompts.jsonl:25"):
        v05_prior_replay.main([str(path), "--history-init", "none", "--only", "context mean"])


@pytest.mark.slow
def test_v05_vs_grpo_pairs_runs_seed_by_seed(tmp_path, capsys):
    def log(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log("v", [{"step": 0, "rollouts": 8, "eval_acc": 0.3}, {"step": 1, "rollouts": 20, "acc": 0.5},
              {"step": 2, "rollouts": 12, "acc": 0.7, "eval_acc": 0.6}])
    log("g", [{"step": 0, "eval_acc": 0.3}, {"step": 1, "rollouts": 16, "acc": 0.25},
              {"step": 2, "rollouts": 16, "acc": 0.5, "eval_acc": 0.5}])
    r = v05_vs_grpo.compare(tmp_path / "v", tmp_path / "g")
    assert r["rollouts"] == 40 and r["big"] == 128 and r["share"] == pytest.approx(40 / 128)  # 8 prompts x 16
    v05_vs_grpo.main(["--v05", str(tmp_path / "v"), "--grpo", str(tmp_path / "g")])
    assert "mean +0.225" in capsys.readouterr().out  # (0.25 + 0.2) / 2
    log("g1", [{"step": 0}, {"step": 1, "rollouts": 16, "acc": 0.25}])
    with pytest.raises(SystemExit, match="different steps"):
        v05_vs_grpo.compare(tmp_path / "v", tmp_path / "g1")
    (tmp_path / "g1" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "rollouts": 16}\n')
    with pytest.raises(SystemExit, match=r"g1/metrics.jsonl:2: .*acc"):
        v05_vs_grpo.compare(tmp_path / "v", tmp_path / "g1")
