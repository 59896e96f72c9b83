"""Every method's baseline as a pure numpy function of the same inputs, for the two notebooks.

The inputs are one policy's real rollouts (benchmarks/baseline_data.py): for each of N prompts a pool of rewards
r [N, n] in the order drawn, and the per-prompt or per-rollout predictions each method makes. A baseline here is
b [N, n], one number per rollout (the value its advantage A_i = r_i - b_i subtracts), on the 0/1 reward scale.
The methods' own files hold the training-time code; these functions call it where it exists (V0.5's fusion and
budget, POISE's leave-one-out) and only arrange the arrays.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import poise  # noqa: E402
import v05  # noqa: E402


def group_mean(r: np.ndarray) -> np.ndarray:
    """GRPO: every rollout of the group gets the group's mean (its own reward included). r [..., N, G] -> [..., N, G]"""
    return np.repeat(r.mean(-1, keepdims=True), r.shape[-1], -1)


def leave_one_out(r: np.ndarray) -> np.ndarray:
    """RLOO: rollout i gets the mean of the other G - 1 rewards (poise.leave_one_out). [N, G] -> [N, G]"""
    return poise.leave_one_out(torch.as_tensor(r, dtype=torch.float64)).numpy()


def sibling_probe(g: np.ndarray) -> np.ndarray:
    """POISE: rollout i gets the mean of the probe's g(z_j) over its siblings j != i. g [N, n] -> [N, n]"""
    return poise.leave_one_out(torch.as_tensor(g, dtype=torch.float64)).numpy()


def per_prompt(v: np.ndarray, n: int) -> np.ndarray:
    """A prediction made before any rollout (V0, a critic's V(s_0)): the same for all n rollouts. [N] -> [N, n]"""
    return np.repeat(np.asarray(v, float)[:, None], n, 1)


def v05_fused(r: np.ndarray, prior: np.ndarray, k_max: int | None = None, cost: float = 0.0039,
              round_max: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """V0.5 replayed on a pool: k_init = 4 rollouts, then the adaptive budget, drawing each prompt's rollouts from
    r [N, n] in order (k_max = n unless given; k_max = 4 is the fusion alone).
    -> (mu [N], k [N]): the fused baseline and the rollouts each prompt spent."""
    N, n = r.shape
    taken = np.zeros(N, dtype=int)

    def draw(counts):
        out = [r[i, taken[i]:taken[i] + c] for i, c in enumerate(counts)]
        taken[:] += counts
        return out
    res = v05.adaptive_rollouts(draw, prior, k_init=4, k_max=k_max or n, cost=cost, round_max=round_max)
    return res["mu"], res["k"]


def mse_against_oracle(b: np.ndarray, p_hat: np.ndarray, oracle_k: int) -> tuple[float, float]:
    """MSE of baselines b [N, ...] against the true p(x), estimated from p_hat [N] (the mean of oracle_k rollouts
    that b never saw). E (b - p_hat)^2 = E (b - p)^2 + Var(p_hat), and p_hat (1 - p_hat) / (K - 1) is an unbiased
    estimate of Var(p_hat), so
        MSE = mean_x [ mean_i (b_xi - p_hat_x)^2 - p_hat_x (1 - p_hat_x) / (K - 1) ].
    -> (MSE, its standard error over prompts)"""
    b = np.asarray(b, float).reshape(len(p_hat), -1)
    per = ((b - p_hat[:, None]) ** 2).mean(1) - p_hat * (1 - p_hat) / (oracle_k - 1)
    return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per)))


def pg_estimate(adv: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The policy-gradient estimate of a batch: mean over prompts of mean_i A_i grad_i (sequence-level; ours).
    adv [..., N, n], grads [..., N, n, d] (grad_i = d/dtheta sum_t log pi(y_t) of rollout i) -> [..., d]"""
    return np.einsum("...xi,...xid->...d", adv, grads) / (adv.shape[-2] * adv.shape[-1])
