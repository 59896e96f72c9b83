"""Every formula of the shared loss machinery against hand-computed values."""
import math

import pytest
import torch

import common as C
from grpo import group_advantages, informative_groups, overlong_penalty


def test_group_advantages_grpo_and_drgrpo():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    a = group_advantages(r, scale_std=True)
    # mean 0.5, std (ddof=1) = sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    assert torch.allclose(a[0], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # all equal: no signal, and no division by zero
    # mean 0.25, std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    assert torch.allclose(a[2], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    d = group_advantages(r, scale_std=False)
    assert torch.allclose(d[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(d[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(d.sum(-1), torch.zeros(3), atol=1e-6)  # the group mean is the baseline


def test_informative_groups_and_overlong():
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert informative_groups(r).tolist() == [False, True, False]
    # L_max = 20, L_cache = 5: no penalty up to 15, then linear to -1 at 20, and -1 past L_max (DAPO)
    pen = overlong_penalty(torch.tensor([10, 15, 16, 18, 20, 23]), max_len=20, buffer=5)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    assert torch.equal(overlong_penalty(torch.tensor([20]), 20, 0), torch.zeros(1))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_aggregation_modes():
    assert C.aggregate(LOSS, MASK, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert C.aggregate(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert C.aggregate(LOSS, MASK, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError):
        C.aggregate(LOSS, MASK, "mean")


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert C.kl_penalty(logp, ref, "k1").item() == pytest.approx(ln2)
    assert C.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * ln2 ** 2)
    assert C.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1)
    assert C.kl_penalty(ref, ref, "k3").item() == 0.0


def test_kl_estimators_match_true_kl_in_expectation():
    """k1 and k3 are unbiased for KL(pi || ref) when tokens are sampled from pi; k3 never goes negative."""
    g = torch.Generator().manual_seed(0)
    pi, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = (pi * (pi / ref).log()).sum().item()
    y = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, lr = pi.log()[y], ref.log()[y]
    for kind in ("k1", "k3"):
        assert C.kl_penalty(lp, lr, kind).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (C.kl_penalty(lp, lr, "k3") >= 0).all()


def test_clipping_and_dual_clip():
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    ratio = torch.tensor([[1.5, 0.5, 5.0, 1.1]])
    logp, old, mask = ratio.log(), torch.zeros(1, 4), torch.ones(1, 4)

    def per_token(**kw):
        return [C.policy_loss(logp[:, i:i + 1], old[:, i:i + 1], adv[:, i:i + 1], mask[:, i:i + 1], **kw)[0].item()
                for i in range(4)]
    # A>0, r=1.5 -> clipped at 1.28; A<0, r=0.5 -> clipped at 0.8; A<0, r=5 -> unclipped 5; r=1.1 inside
    assert per_token(eps_low=0.2, eps_high=0.28) == pytest.approx([-1.28, 0.8, 5.0, -1.1])
    # dual-clip caps the loss of a negative advantage at -A * c
    assert per_token(eps_low=0.2, eps_high=0.28, dual_clip=3.0) == pytest.approx([-1.28, 0.8, 3.0, -1.1])
    _, st = C.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert st["clip_frac"] == pytest.approx(2 / 4)


def test_clipped_gradient_is_zero_outside_the_trust_region():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = C.policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), agg="token-mean")
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # clipped token: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)  # d(-A r)/d logp = -A r, / 2 tokens


def test_on_policy_loss_gradient_is_reinforce():
    """With logp_old = logp (one update per batch) the loss is -mean(A) but its gradient is -A/N per token."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, 0.5, 0.5]])
    loss, _ = C.policy_loss(logp, logp.detach(), adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.full((1, 3), -0.5 / 3))


def test_kl_term_added_to_loss():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    base, _ = C.policy_loss(logp, logp, torch.zeros(1, 1), torch.ones(1, 1))
    with_kl, st = C.policy_loss(logp, logp, torch.zeros(1, 1), torch.ones(1, 1), ref_logp=ref, kl_coef=0.1, kl_type="k1")
    assert with_kl.item() - base.item() == pytest.approx(0.1 * math.log(2))
    assert st["kl"] == pytest.approx(math.log(2))


def test_masked_whiten_ignores_padding():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = C.masked_whiten(x, m)
    s = math.sqrt(1.5)  # var of {1,2,3} (ddof=0) = 2/3 -> 1/std = sqrt(1.5)
    assert torch.allclose(w, torch.tensor([-s, 0.0, s, 0.0]), atol=1e-4)
    assert C.masked_mean(x, m).item() == pytest.approx(2.0)
    w2 = C.masked_whiten(torch.tensor([1.0, 2.0, 3.0, -5.0]), m)  # the padded value changes nothing
    assert torch.allclose(w, w2)


def test_rows_without_signal():
    """Rows whose advantages are all 0 add nothing, so they may skip forward/backward, unless a KL term is in the
    loss (then every row has a gradient)."""
    adv = torch.tensor([[0.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    assert C.rows_without_signal(adv).tolist() == [True, False, False]
    assert C.rows_without_signal(adv, ref_logp=torch.zeros(3, 2)) is None


def test_batch_metrics_mean_one_thing_in_every_method():
    """adv_std is the std over rollouts of one advantage per rollout (ddof 1, as torch.std); a group of one has no
    spread to measure; ragged groups (V0.5) count each group once; clipped_ratio is the share cut at the limit."""
    rolls = [C.Rollout(0, [1], [7] * n, "", [0.0] * n, "length" if n == 7 else "stop") for n in (3, 4, 5, 6, 7)]
    m = C.batch_metrics([[1.0, 1.0], [0.0, 1.0, 1.0]], torch.tensor([0.0, 0.0, -1.0, 0.5, 0.5]), rolls, no_answer=2)
    assert m["adv_std"] == pytest.approx(torch.tensor([0.0, 0.0, -1.0, 0.5, 0.5]).std().item())
    assert m["frac_reward_zero_std"] == 0.5 and m["rollouts"] == 5 and m["tokens"] == 25
    assert m["resp_len"] == 5.0 and m["no_answer"] == 2 and m["clipped_ratio"] == pytest.approx(0.2)
    assert C.batch_metrics([[1.0], [0.0]], torch.tensor([0.3, -0.3]), rolls[:2], 0)["frac_reward_zero_std"] is None


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    p = tmp_path / "rows.jsonl"
    with C.atomic_file(p) as tmp:
        tmp.write_text("a\n")
        assert not p.exists()  # nothing at the final path while writing
    assert p.read_text() == "a\n"
    with pytest.raises(RuntimeError):
        with C.atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert p.read_text() == "a\n" and list(tmp_path.iterdir()) == [p]  # the old file, no temporary left
