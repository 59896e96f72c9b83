"""Each shared formula against an independent loop on random padded batches, pinning the conventions where
verl's core_algos and TRL's GRPOTrainer differ from ours (the docstrings name them): ddof and eps
placement, groups of one, no clamps, empty rows, the Dr.GRPO constant, dual-clip on A < 0 only."""
import math
import types

import numpy as np
import pytest
import torch

import common as C
import ppo
from grpo import group_advantages


def padded(B=7, L=9, seed=0, empty_row=False):
    """[B, L] right-padded mask with random lengths 1..L (row 0 full; the last row empty if asked)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    if empty_row:
        lens[-1] = 0
    return (torch.arange(L)[None] < lens[:, None]).double(), g


def rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("G", [2, 4, 8])
def test_group_advantages_match_a_loop_with_ddof_1(G):
    g = torch.Generator().manual_seed(G)
    r = torch.cat([torch.randint(0, 2, (5, G), generator=g).double(), rand(g, 3, G)])
    a, d = group_advantages(r, scale_std=True), group_advantages(r, scale_std=False)
    for i, row in enumerate(r.numpy()):
        m, s = row.mean(), row.std(ddof=1)
        assert np.allclose(d[i].numpy(), row - m, atol=1e-12)
        assert np.allclose(a[i].numpy(), (row - m) / (s + 1e-6), atol=1e-9)


def test_group_advantages_eps_is_added_to_the_std_and_a_group_of_one_gets_zero():
    # mean 1e-6, std (ddof 1) = sqrt(2) e-6: A = 1e-6 / ((sqrt(2) + 1) e-6) = sqrt(2) - 1. ddof 0 would give
    # 0.5, eps under the square root ~1e-3, TRL's eps 1e-4 ~0.01
    a = group_advantages(torch.tensor([[0.0, 2e-6]], dtype=torch.float64))
    assert a[0].tolist() == pytest.approx([-(math.sqrt(2) - 1), math.sqrt(2) - 1], rel=1e-9)
    for scale in (True, False):  # TRL's convention: a singleton is its own baseline (verl's would give ~r)
        assert torch.equal(group_advantages(torch.tensor([[0.7], [1.0]]), scale), torch.zeros(2, 1))


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_whiten_matches_numpy_over_real_tokens(unbiased):
    mask, g = padded()
    x = rand(g, *mask.shape, scale=3.0) + 1.0
    real = x[mask.bool()].numpy()
    var = real.var(ddof=1 if unbiased else 0)
    want = (x.numpy() - real.mean()) / np.sqrt(var + 1e-8)
    w = C.masked_whiten(x, mask, unbiased=unbiased)
    assert np.allclose(w.numpy()[mask.bool().numpy()], want[mask.bool().numpy()], atol=1e-9)
    assert torch.equal(w[~mask.bool()], torch.zeros(int((1 - mask).sum()), dtype=x.dtype))  # padding: 0
    kept = C.masked_whiten(x, mask, shift_mean=False, unbiased=unbiased)  # mean added back after scaling
    assert torch.allclose(kept, (w + real.mean()) * mask)
    assert torch.equal(C.masked_whiten(x[:1, :1], mask[:1, :1], unbiased=unbiased), torch.zeros(1, 1, dtype=x.dtype))


def test_masked_mean_per_row_and_of_an_empty_mask():
    mask, g = padded(empty_row=True)
    x = rand(g, *mask.shape)
    rows = C.masked_mean(x, mask, dim=-1)
    for i in range(len(x) - 1):
        n = int(mask[i].sum())
        assert rows[i].item() == pytest.approx(x[i, :n].mean().item(), abs=1e-12)
    assert rows[-1].item() == 0.0 and C.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_kl_estimators_are_not_clamped():
    """verl clamps k3's log-ratio to [-20, 20] and k3 to [-10, 10]; ours (and TRL's) do not."""
    x = torch.tensor([-15.0, -3.0, 0.5, 30.0], dtype=torch.float64)
    lp, ref = x, torch.zeros_like(x)
    assert C.kl_penalty(lp, ref, "k3").tolist() == pytest.approx([math.exp(-v) + v - 1 for v in x.tolist()], rel=1e-12)
    assert C.kl_penalty(lp, ref, "k1").tolist() == pytest.approx(x.tolist())
    assert C.kl_penalty(lp, ref, "k2").tolist() == pytest.approx([v * v / 2 for v in x.tolist()])
    with pytest.raises(ValueError, match="kl_type"):
        C.kl_penalty(lp, ref, "k4")


def test_aggregations_match_loops_with_an_empty_row():
    mask, g = padded(empty_row=True)
    B, L = mask.shape
    loss = rand(g, B, L)
    lens = mask.sum(-1).long().tolist()
    sums = [loss[i, :n].sum().item() for i, n in enumerate(lens)]
    assert C.aggregate(loss, mask, "token-mean").item() == pytest.approx(sum(sums) / sum(lens), abs=1e-12)
    # the empty row counts in B with loss 0 (TRL); verl would divide by B - 1
    assert C.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(
        sum(s / n for s, n in zip(sums, lens) if n) / B, abs=1e-12)
    assert C.aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=40).item() == pytest.approx(
        sum(sums) / (B * 40), abs=1e-12)
    assert C.aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(sum(sums) / (B * L), abs=1e-12)


def reference_token_loss(lr, a, eps_low, eps_high, c):
    """One token's clipped-surrogate loss, written from the PPO / DAPO / dual-clip papers' formulas."""
    ratio = math.exp(lr)
    loss = max(-a * ratio, -a * min(max(ratio, 1 - eps_low), 1 + eps_high))
    clipped = -a * min(max(ratio, 1 - eps_low), 1 + eps_high) > -a * ratio
    if c and a < 0:
        loss = min(loss, -a * c)
    return loss, clipped


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_policy_loss_matches_a_per_token_loop(agg, dual_clip):
    mask, g = padded(seed=3)
    B, L = mask.shape
    old = rand(g, B, L)
    log_ratio = rand(g, B, L, scale=0.6)
    log_ratio[0, 0] = 25.0  # no clamp of the log-ratio (verl clamps it to 20)
    adv = rand(g, B, L)
    adv[0, 0] = -0.5
    per_tok, clipped = torch.zeros(B, L, dtype=torch.float64), torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        for t in range(L):
            per_tok[i, t], clipped[i, t] = reference_token_loss(log_ratio[i, t].item(), adv[i, t].item(), 0.2, 0.28,
                                                                dual_clip)
    loss, st = C.policy_loss(old + log_ratio, old, adv, mask, 0.2, 0.28, dual_clip, agg, max_len=12)
    want = C.aggregate(per_tok, mask, agg, max_len=12)  # aggregate has its own loop test above
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    assert st["clip_frac"] == pytest.approx((clipped * mask).sum().item() / mask.sum().item())


def test_dual_clip_must_exceed_one():
    one = torch.ones(1, 1)
    for c in (0.5, 1.0, -3.0):
        with pytest.raises(ValueError, match="dual_clip"):
            C.policy_loss(one, one, one, one, dual_clip=c)
    with pytest.raises(ValueError, match="--dual-clip"):
        C.TrainArgs(dual_clip=0.5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V = 0 after the last real token;
    dense random rewards, so every index and both constants matter."""
    mask, g = padded(seed=5)
    B, L = mask.shape
    r, v = rand(g, B, L) * mask, rand(g, B, L)
    adv, ret = ppo.gae(r, v, mask, gamma, lam)
    for i in range(B):
        n = int(mask[i].sum())
        vn = v[i, :n].tolist() + [0.0]
        delta = [r[i, t].item() + gamma * vn[t + 1] - vn[t] for t in range(n)]
        want = [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]
        assert adv[i, :n].tolist() == pytest.approx(want, abs=1e-10)
        assert ret[i, :n].tolist() == pytest.approx([w + vn[t] for t, w in enumerate(want)], abs=1e-10)
        assert not adv[i, n:].any() and not ret[i, n:].any()


def test_token_rewards_on_random_lengths():
    mask, g = padded(seed=7)
    B, L = mask.shape
    score, lp, ref = rand(g, B), rand(g, B, L), rand(g, B, L)
    r = ppo.token_rewards(score, mask, lp, ref, beta=0.1)
    for i in range(B):
        n = int(mask[i].sum())
        want = [-0.1 * (lp[i, t] - ref[i, t]).item() + (score[i].item() if t == n - 1 else 0.0) for t in range(n)]
        assert r[i, :n].tolist() == pytest.approx(want, abs=1e-12) and not r[i, n:].any()


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_value_loss_and_explained_variance_match_their_formulas(clip):
    mask, g = padded(seed=9)
    v, v_old, R = rand(g, *mask.shape), rand(g, *mask.shape), rand(g, *mask.shape)
    m = mask.bool()
    vc = v_old + (v - v_old).clamp(-clip, clip)
    per = (v - R) ** 2 if clip == 0 else torch.maximum((v - R) ** 2, (vc - R) ** 2)
    assert ppo.value_loss(v, v_old, R, mask, clip).item() == pytest.approx(0.5 * per[m].mean().item(), rel=1e-12)
    ev = 1 - np.var((R - v)[m].numpy()) / np.var(R[m].numpy())
    assert ppo.explained_variance(v, R, mask) == pytest.approx(ev, rel=1e-9)
    assert math.isnan(ppo.explained_variance(v, torch.ones_like(R), mask))  # constant returns: undefined


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_minibatch_update_accumulates_exactly_the_mini_batch_gradient(agg):
    """Micro-batches of 2 rows, one row skipped (it adds 0 but still counts in the share): the accumulated
    gradient equals that of one loss over the whole mini-batch."""
    mask, g = padded(B=5, seed=11)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    coef = rand(g, 5, mask.shape[1])
    coef[3] = 0.0  # row 3 adds exactly 0: skipped

    def loss_fn(rows):
        return C.aggregate(w[rows, None] * coef[rows], mask[rows], agg), {}
    args = types.SimpleNamespace(epochs=1, minibatch_size=0, micro_batch_size=2, seed=0, max_grad_norm=1e9)
    opt, seen = torch.optim.SGD([w], lr=0.0), []
    opt.step = lambda: seen.append(w.grad.clone())  # the accumulated gradient the step sees (freed after)
    C.minibatch_update(opt, mask, args, loss_fn, agg, skip=torch.tensor([False, False, False, True, False]))
    got = seen[0]
    assert w.grad is None  # minibatch_update frees the gradients before the next sampling phase
    loss_fn(torch.arange(5))[0].backward()
    assert torch.allclose(got, w.grad, atol=1e-12)
