"""ppo.py: token rewards, GAE, the clipped value loss, the critic, and the script end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common as C
import ppo
from conftest import ROOT, run_script


def test_gae_hand_computed_with_padding():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 99.0]])  # 99 sits on padding and must not leak
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(r, v, m, gamma=1.0, lam=1.0)  # A_t = (sum of future rewards) - V_t
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3], [0.8, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), atol=1e-6)
    adv, _ = ppo.gae(r, v, m, gamma=1.0, lam=0.5)
    # deltas row 0: 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*A1
    assert torch.allclose(adv[0], torch.tensor([0.225, 0.25, 0.3]), atol=1e-6)
    # row 1: deltas 0.2, 0.6 (V after the last real token is 0) -> A1 = 0.6, A0 = 0.2 + 0.5*0.6
    assert torch.allclose(adv[1], torch.tensor([0.5, 0.6, 0.0]), atol=1e-6)
    adv, _ = ppo.gae(r, v, m, gamma=0.9, lam=1.0)  # A_t = gamma^(T-1-t) R - V_t for a terminal reward
    assert torch.allclose(adv[0], torch.tensor([0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.7]), atol=1e-6)


def test_gae_telescopes_at_gamma_lambda_one():
    """gamma = lambda = 1, zero intermediate rewards: A_t = R - V_t for every t, whatever V is."""
    torch.manual_seed(0)
    v, m = torch.randn(4, 7), torch.ones(4, 7)
    m[1, 5:], m[3, 2:] = 0, 0
    lengths = m.sum(-1).long()
    R = torch.randn(4)
    r = torch.zeros(4, 7)
    r[torch.arange(4), lengths - 1] = R
    adv, _ = ppo.gae(r, v, m, 1.0, 1.0)
    assert torch.allclose(adv, (R[:, None] - v) * m, atol=1e-5)


def test_token_rewards_put_the_score_on_the_last_real_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = ppo.token_rewards(torch.tensor([1.0, 0.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    r = ppo.token_rewards(torch.tensor([0.0, 1.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_token_rewards_kl_penalty_per_token():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp, ref = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
    r = ppo.token_rewards(torch.tensor([1.0]), mask, logp, ref, beta=0.1)
    # -beta * (logp - ref) = [-0.05, +0.1], + score 1 on the last real token, padding stays 0
    assert torch.allclose(r, torch.tensor([[-0.05, 1.1, 0.0]]))


def test_clipped_value_loss_hand_computed():
    m = torch.ones(1, 1)
    t = lambda x: torch.tensor([[x]])  # noqa: E731
    # V moved 0.2 -> 0.5 towards R = 1; the clipped V is 0.4: max(0.25, 0.36) / 2
    assert ppo.value_loss(t(0.5), t(0.2), t(1.0), m, clip=0.2).item() == pytest.approx(0.18)
    # inside the clip range both terms agree
    assert ppo.value_loss(t(0.3), t(0.2), t(0.0), m, clip=0.2).item() == pytest.approx(0.045)
    # moved away from R: the unclipped term is the larger one
    assert ppo.value_loss(t(0.9), t(0.5), t(0.0), m, clip=0.2).item() == pytest.approx(0.405)
    assert ppo.value_loss(t(0.5), t(0.2), t(1.0), m, clip=0.0).item() == pytest.approx(0.125)
    v, mask = torch.tensor([[0.0, 5.0]]), torch.tensor([[1.0, 0.0]])  # padding does not count
    assert ppo.value_loss(v, v, torch.tensor([[1.0, 0.0]]), mask).item() == pytest.approx(0.5)


def test_explained_variance():
    R = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert ppo.explained_variance(R, R, m) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(R, 0.3), R, m) == pytest.approx(0.0, abs=1e-6)
    assert ppo.explained_variance(1 - R, R, m) < 0  # anti-correlated critic: worse than a constant


@pytest.mark.parametrize("kw,msg", [(dict(gamma=1.5), "--gamma must be in [0, 1]"), (dict(lam=-0.1), "--lam must be in [0, 1]"),
                                    (dict(group_size=0), "--group-size must be >= 1"),
                                    (dict(value_clip=-0.2), "--value-clip must be >= 0"),
                                    (dict(critic_warmup=-1), "--critic-warmup must be >= 0")])
def test_flags_that_make_no_sense_are_rejected_naming_the_flag(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        ppo.Args(**kw)


def test_range_checks_reject_nan_and_accept_the_edges():
    with pytest.raises(ValueError, match="--gamma must be in"):
        ppo.Args(gamma=float("nan"))
    ppo.Args(gamma=0.0, lam=1.0, value_clip=0.0, critic_warmup=0)


def test_shuffled_batches_cover_each_pass_once_and_repeat_on_resume():
    """7 rows in batches of 3: 3 batches a pass (the last one short), every row once a pass, new orders each pass."""
    passes = [[C.shuffled_batch(step, 7, 3, seed=0) for step in range(1 + 3 * e, 4 + 3 * e)] for e in range(2)]
    assert [len(b) for b in passes[0]] == [3, 3, 1]
    assert all(sorted(sum(p, [])) == list(range(7)) for p in passes)
    assert passes[0] != passes[1] and C.shuffled_batch(5, 7, 3, seed=0) == passes[1][1]


def test_second_model_copies_the_policy_or_checks_the_tokenizer(tiny_lm, monkeypatch):
    lm, path = ppo.second_model("", tiny_lm.requires_grad_(False), None, "here", "cpu", torch.float32, "--critic")
    assert path == "here" and lm is not tiny_lm and all(p.requires_grad for p in lm.parameters())
    vocab = type("Tok", (), {"get_vocab": lambda self: {"a": 0}})
    other = type("Tok", (), {"get_vocab": lambda self: {"b": 0}})
    monkeypatch.setattr(C, "load_model", lambda name, device, dtype: (tiny_lm, other(), "there"))
    with pytest.raises(SystemExit, match="--critic small: its tokenizer differs"):
        ppo.second_model("small", tiny_lm, vocab(), "here", "cpu", torch.float32, "--critic")
    monkeypatch.setattr(C, "load_model", lambda name, device, dtype: (tiny_lm, vocab(), "there"))
    assert ppo.second_model("small", tiny_lm, vocab(), "here", "cpu", torch.float32, "--critic") == (tiny_lm, "there")


def test_value_model_reads_the_state_before_each_response_token(tiny_lm):
    """V(s_t) for response token t is the head on the decoder's final state at column P - 1 + t (the one that
    predicts y_t), padding and prompts of other lengths included."""
    critic = ppo.ValueModel(tiny_lm)
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    rolls = [C.Rollout(i, [5, 6, 7][: 1 + i], [10, 11, 12, 13][: 2 + i], "", [0.0] * 4, "stop") for i in range(3)]
    batch = C.collate(rolls, pad_id=0)
    with torch.no_grad():
        h = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[-1]
        P, L = batch["prompt_len"], batch["response_ids"].shape[1]
        want = critic.head(h[:, P - 1:P - 1 + L]).squeeze(-1)
        assert torch.allclose(critic(batch), want, atol=1e-6)


def test_value_model_starts_at_zero_and_learns(tiny_lm):
    critic = ppo.ValueModel(tiny_lm)
    rolls = [C.Rollout(i, [5, 6, 7 + i], [10, 11, 12][: 1 + i], "", [0.0] * (1 + i), "stop") for i in range(3)]
    batch = C.collate(rolls, pad_id=0)
    v = critic(batch)
    assert v.shape == (3, 3) and torch.equal(v, torch.zeros(3, 3))
    returns = torch.tensor([[1.0, 0, 0], [0.0, 0.0, 0], [1.0, 1.0, 1.0]]) * batch["response_mask"]
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    args = ppo.Args(epochs=20, micro_batch_size=2)
    first = ppo.value_loss(v.detach(), v.detach(), returns, batch["response_mask"], 0.0).item()
    ppo.value_update(critic, opt, batch, returns, v.detach(), args, clip=0.0)
    with torch.no_grad():
        after = ppo.value_loss(critic(batch), v, returns, batch["response_mask"], 0.0).item()
    assert after < 0.5 * first


def test_fit_critic_moves_v_s0_towards_the_success_rate(tiny_lm):
    """fit_critic on fixed rollouts: with gamma = lambda = 1 every state's target is the outcome, so V(s_0) of two
    prompts, one always solved and one never, separate towards 1 and 0."""
    critic = ppo.ValueModel(tiny_lm)
    rolls = [C.Rollout(i // 2, [5, 6 + i // 2], [10, 11], "", [0.0, 0.0], "stop") for i in range(4)]
    batch = C.collate(rolls, pad_id=0)
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0])
    args = ppo.Args(lam=1.0, epochs=5, micro_batch_size=4)
    seen = []
    ppo.fit_critic(critic, torch.optim.AdamW(critic.parameters(), lr=1e-2), batch, scores, args, epochs=4,
                   log=lambda epoch, st: seen.append(st["value_loss"]))
    v0 = ppo.critic_values(critic, batch, 4)[:, 0]
    assert len(seen) == 4 and seen[-1] < seen[0]
    assert v0[0] > v0[2] + 0.3 and abs(v0[0] - v0[1]) < 1e-6  # same prompt, same state s_0


@pytest.mark.slow
def test_ppo_end_to_end(tmp_path):
    out = tmp_path / "ppo"
    run_script("ppo.py", "--steps", "2", "--prompts-per-step", "4", "--max-new-tokens", "16", "--data",
               str(ROOT / "tests" / "data" / "easy_add.jsonl"), "--eval-problems", "2", "--oracle-k", "2", "--seed", "1",
               "--out", str(out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert set(C.METRICS) | {"value_loss", "explained_variance", "baseline_mse"} <= set(r)
        assert r["rollouts"] == 4 and r["value_loss"] is not None
    assert rows[1]["grad_norm"] is None, "step 1 is critic warm-up: the policy must not move"
    assert rows[2]["grad_norm"] is not None
    crit = load_file(out / "ckpt" / "critic" / "model.safetensors")
    assert "head.weight" in crit and len(crit) > 100  # the whole critic LM is saved, not just the head


def test_checkpoint_roundtrip_with_a_critic(tiny_lm, tmp_path):
    """Policy (HF folder) and critic (plain module) go into one atomic checkpoint and come back whole."""
    import copy
    policy, critic = tiny_lm, ppo.ValueModel(copy.deepcopy(tiny_lm))
    with torch.no_grad():
        critic.head.weight.fill_(0.5)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in [("policy", policy), ("critic", critic)]}
    for m, o in [(policy, opts["policy"]), (critic, opts["critic"])]:  # one step so the moments exist
        sum(p.sum() for p in m.parameters()).backward()
        o.step()
    C.save_checkpoint(str(tmp_path), 7, {"policy": (policy, opts["policy"]), "critic": (critic, opts["critic"])},
                      {"cursor": 3})
    p2, c2 = copy.deepcopy(policy), ppo.ValueModel(copy.deepcopy(tiny_lm))
    for m in (p2, c2):
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
    o2 = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in [("policy", p2), ("critic", c2)]}
    state = C.load_checkpoint(str(tmp_path), {"policy": (p2, o2["policy"]), "critic": (c2, o2["critic"])})
    assert state["step"] == 7 and state["extra"] == {"cursor": 3}
    for a, b in [(policy, p2), (critic, c2)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert o2["critic"].state_dict()["state"][0]["step"] == 1
    assert not (tmp_path / "ckpt.tmp").exists() and not (tmp_path / "ckpt.old").exists()
