"""dvpo.py: TD(lambda) targets, the telescoping case, both reward settings, the official whitening and KL
controller, the presets, the data readers, train() with its GVM frozen, and both stages end to end with
exact resume."""
import hashlib
import json

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
import dvpo
import ppo
from conftest import ROOT, run_script, rolled_back

sys.path.insert(0, str(ROOT / "benchmarks"))
import dvpo_signal  # noqa: E402

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
STAGE1 = ["--data", EASY, "--max-new-tokens", "12", "--collect-problems", "6", "--collect-n", "2", "--gvm-batch", "4",
          "--gvm-epochs", "2", "--gvm-holdout", "0.34", "--seed", "1"]
STAGE2 = ["--data", EASY, "--max-new-tokens", "12", "--prompts-per-step", "2", "--group-size", "2",
          "--eval-problems", "2", "--oracle-k", "2", "--seed", "1"]


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- the math


def test_td_lambda_targets_hand_computed():
    # V = [0.2, 0.5, 0.6], r = 1 on the last token, gamma 1, lambda 0.5:
    # delta = [0.3, 0.1, 0.4]; A_2 = 0.4, A_1 = 0.1 + 0.5 * 0.4 = 0.3, A_0 = 0.3 + 0.5 * 0.3 = 0.45; G = A + V
    V, mask = T([0.2, 0.5, 0.6], [0.7, 0.0, 0.0]), T([1, 1, 1], [1, 0, 0])
    G = dvpo.td_lambda_targets(torch.tensor([1.0, -1.0]), V, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(G, T([0.65, 0.8, 1.0], [-1.0, 0.0, 0.0]))  # a one-token sequence: G = r; padding: 0
    # the same G_0 as the lambda-return: (1 - lambda)(G^(1) + lambda G^(2)) + lambda^2 G^(full)
    assert G[0, 0].item() == pytest.approx(0.5 * (0.5 + 0.5 * 0.6) + 0.25 * 1.0)


def test_td_lambda_targets_are_the_lambda_return():
    """G_t = (1 - lambda) sum_{n>=1} lambda^(n-1) G_t^(n) (n-step returns, truncated at the end), gamma < 1."""
    torch.manual_seed(0)
    L, gamma, lam, r = 7, 0.9, 0.8, 1.0
    V = torch.rand(1, L)
    G = dvpo.td_lambda_targets(torch.tensor([r]), V, torch.ones(1, L), gamma, lam)[0]
    for t in range(L):
        n_step = [gamma ** n * V[0, t + n].item() if t + n < L else gamma ** (L - 1 - t) * r for n in range(1, L - t + 1)]
        want = (1 - lam) * sum(lam ** (n - 1) * g for n, g in enumerate(n_step[:-1], 1)) + lam ** (L - t - 1) * n_step[-1]
        assert G[t].item() == pytest.approx(want, abs=1e-5)


def test_paper_rewards_telescope_to_minus_v_when_gamma_and_lambda_are_1():
    V, mask = T([0.3, -0.2, 0.9, 0.0], [0.5, 0.1, 0.0, 0.0]), T([1, 1, 1, 0], [1, 1, 0, 0])
    logp = T([-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0])
    r = dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "paper", logp, logp.clone(), beta=0.1)
    assert torch.equal(r, torch.zeros_like(r))  # pi = pi_ref: the KL reward is 0, and no task reward
    A = dvpo.dvpo_advantages(V, r, mask, gamma=1.0, lam=1.0, whiten_adv=False)
    assert torch.allclose(A, -V * mask)
    # with a KL reward: r_t = -beta (log pi - log pi_ref), and A_t = (sum of the rewards from t on) - V_t
    ref = logp - T([0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0])
    r = dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "paper", logp, ref, beta=0.5)
    assert torch.allclose(r, T([-0.05, -0.1, -0.15, 0.0], [-0.2, 0.0, 0.0, 0.0]))
    A = dvpo.dvpo_advantages(V, r, mask, gamma=1.0, lam=1.0, whiten_adv=False)
    assert torch.allclose(A, (r.flip(-1).cumsum(-1).flip(-1) - V) * mask)


def test_paper_signal_is_the_rise_of_the_value_when_lambda_below_1():
    """No reward: A_t = (1 - lambda) sum_{m>=1} lambda^(m-1) V_{t+m} - V_t (the docstring's identity)."""
    torch.manual_seed(1)
    L, lam = 6, 0.95
    V, mask = torch.randn(1, L), torch.ones(1, L)
    A = dvpo.dvpo_advantages(V, torch.zeros(1, L), mask, 1.0, lam, whiten_adv=False)[0]
    for t in range(L):
        want = (1 - lam) * sum(lam ** (m - 1) * V[0, t + m] for m in range(1, L - t)) - V[0, t]
        assert A[t].item() == pytest.approx(float(want), abs=1e-6)


def test_rlvr_rewards_add_the_outcome_and_lambda_1_gives_r_minus_v():
    V, mask = T([0.2, 0.4, 0.3], [0.6, 0.0, 0.0]), T([1, 1, 1], [1, 0, 0])
    r = dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "rlvr")
    assert r.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    A = dvpo.dvpo_advantages(V, r, mask, 1.0, 1.0, whiten_adv=False)
    assert torch.allclose(A, (T([1, 1, 1], [0, 0, 0]) - V) * mask)  # A_t = r - V(s_t): a baseline, unbiased
    assert dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "paper").abs().sum() == 0


def test_terminal_reward_reaches_token_t_with_weight_lambda_to_the_distance():
    """The rlvr docstring: A_t = lam^K (r - V_t) + (1 - lam) sum_{m=1}^K lam^(m-1) (V_{t+m} - V_t), K = T-1-t;
    so r reaches token 0 of 48 with weight 0.95^47 = 0.09, and lambda = 1 leaves A_t = r - V_t."""
    torch.manual_seed(3)
    L, lam = 48, 0.95
    V, mask = torch.rand(1, L), torch.ones(1, L)
    A = [dvpo.dvpo_advantages(V, dvpo.dvpo_rewards(torch.tensor([s]), mask, "rlvr"), mask, 1.0, lam, whiten_adv=False)[0]
         for s in (0.0, 1.0)]
    assert (A[1] - A[0])[0].item() == pytest.approx(0.0897, abs=1e-4)
    for t in (0, 20, L - 1):
        K = L - 1 - t
        want = lam ** K * (1 - V[0, t]) + (1 - lam) * sum(lam ** (m - 1) * (V[0, t + m] - V[0, t]) for m in range(1, K + 1))
        assert A[1][t].item() == pytest.approx(float(want), abs=1e-5)
    assert dvpo.Args().lam == 1.0  # the rlvr default: the verifier's reward reaches every token whole


def test_whiten_rows_and_response_values_hand_computed():
    """Each row over all its real positions (prompt, response, the state after the last token), n - 1 in the
    variance, padding out; then the states before each response token are cut out."""
    x, attn = T([0.0, 1.0, 2.0, 3.0]), T([0, 1, 1, 1])
    assert torch.allclose(dvpo.whiten_rows(x[None], attn[None])[0], T([0.0, -1.0, 0.0, 1.0]))  # var (1+0+1)/2 = 1
    batch = {"prompt_len": 2, "response_ids": torch.zeros(2, 2, dtype=torch.long), "response_mask": T([1, 1], [1, 0]),
             "attention_mask": T([1, 1, 1, 1], [0, 1, 1, 0])}
    v_all = T([1.0, 2.0, 3.0, 6.0], [9.0, 1.0, 3.0, 9.0])  # [B, P+L]; response states at positions 1, 2
    s0, s1 = (14 / 3) ** 0.5, 2 ** 0.5  # row 0: mean 3, var (4+1+0+9)/3; row 1: positions 1-2, mean 2, var 2
    assert torch.allclose(dvpo.response_values(v_all, batch, whiten=True), T([-1 / s0, 0.0], [-1 / s1, 0.0]), atol=1e-6)
    assert torch.equal(dvpo.response_values(v_all, batch), T([2.0, 3.0], [1.0, 0.0]))  # raw, padding 0
    # whitening is shift- and scale-free, per row: rescaling one row alone changes nothing
    assert torch.allclose(dvpo.response_values(v_all * T([3.0], [0.5]) + 7, batch, whiten=True),
                          dvpo.response_values(v_all, batch, whiten=True), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2's positions are absolute: position_ids must reach it
def test_gvm_all_values_cut_to_the_response_are_the_value_models(tiny_lm, arch):
    from transformers import GPT2Config, GPT2LMHeadModel
    lm = tiny_lm if arch == "llama" else GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4,
                                                                     bos_token_id=2, eos_token_id=1)).eval()
    rolls = [C.Rollout(0, [5, 6, 7][: 1 + i % 3], [10 + i, 11, 12][: 1 + i % 3], "", [0.0] * 3, "stop") for i in range(3)]
    batch, gvm = C.collate(rolls, pad_id=0), ppo.ValueModel(lm)
    torch.nn.init.normal_(gvm.head.weight, std=0.5)
    v_all = dvpo.gvm_all_values(gvm, batch, micro=2)
    assert v_all.shape == batch["input_ids"].shape
    with torch.no_grad():
        want = gvm(batch) * batch["response_mask"]
    assert torch.allclose(dvpo.response_values(v_all, batch), want, atol=1e-6)


def test_adaptive_kl_hand_computed():
    """beta <- beta (1 + clip(kl / target - 1, -0.2, 0.2) n / horizon), horizon 10000 (TRL's, the official code's)."""
    assert dvpo.adaptive_kl(0.2, 6.0, 100, 6.0) == pytest.approx(0.2)
    assert dvpo.adaptive_kl(0.2, 6.6, 100, 6.0) == pytest.approx(0.2 * (1 + 0.1 * 0.01))
    assert dvpo.adaptive_kl(0.2, 5.4, 100, 6.0) == pytest.approx(0.2 * (1 - 0.1 * 0.01))
    assert dvpo.adaptive_kl(0.2, 60.0, 100, 6.0) == pytest.approx(0.2 * (1 + 0.2 * 0.01))  # error clipped at +0.2
    assert dvpo.adaptive_kl(0.2, 0.0, 100, 6.0) == pytest.approx(0.2 * (1 - 0.2 * 0.01))  # and at -0.2
    assert dvpo.adaptive_kl(0.2, 0.0, 100, 6.0, horizon=1000.0) == pytest.approx(0.2 * (1 - 0.2 * 0.1))


def test_presets_give_the_same_run_from_python_and_the_command_line():
    assert dvpo.VARIANTS["paper"] == {"whiten_values": True, "kl_coef": 0.2, "kl_target": 6.0, "lam": 0.95}
    for v, preset in dvpo.VARIANTS.items():
        a = dvpo.Args(variant=v)
        assert a == C.parse_args(dvpo.Args, ["--variant", v])
        assert {k: getattr(a, k) for k in preset} == preset
    assert dvpo.Args(variant="paper", lam=1.0).lam == 1.0  # explicit values win
    assert C.parse_args(dvpo.Args, ["--variant", "paper", "--no-whiten-values"]).whiten_values is False


@pytest.mark.parametrize("argv, flag", [(["--lam", "1.5"], "--lam"), (["--gvm-holdout", "1"], "--gvm-holdout"),
                                        (["--variant", "paper", "--kl-coef", "0"], "--kl-target"),
                                        (["--pair-scores", "1"], "--pair-scores"), (["--gvm-batch", "0"], "--gvm-batch"),
                                        (["--gvm-minibatch", "-1"], "--gvm-minibatch")])
def test_bad_flags_are_rejected_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit):
        C.parse_args(dvpo.Args, argv)
    assert flag in capsys.readouterr().err


def test_realised_returns_discount_from_the_end():
    mask = T([1, 1, 1], [1, 1, 0])
    R = dvpo.realised_returns(torch.tensor([1.0, 2.0]), mask, gamma=0.5)
    assert torch.allclose(R, T([0.25, 0.5, 1.0], [1.0, 2.0, 0.0]))


@pytest.mark.parametrize("structure", [{}, {"epochs": 2, "minibatch_size": 2}])
def test_gvm_update_holds_the_targets_of_a_no_grad_pass_before_the_batch(tiny_lm, structure):
    """One step per batch: bootstrapping on the detached values of the same forward = targets from a no-grad pass
    first. Several steps per batch (official: 2 passes of one-row steps): the targets stay those of that first
    pass, however the steps move the GVM."""
    import copy
    rolls = [C.Rollout(0, [5, 6, 7][: 1 + i % 3], [10 + i, 11, 12, 13][: 2 + i % 3], "", [0.0] * 4, "stop")
             for i in range(5)]
    batch, score = C.collate(rolls, pad_id=0), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    args = dvpo.Args(micro_batch_size=2, gamma=1.0, gvm_lam=0.9, **structure)
    a = ppo.ValueModel(tiny_lm)
    torch.nn.init.normal_(a.head.weight, std=0.5)  # non-zero values, so the bootstrap matters
    b, head0 = copy.deepcopy(a), a.head.weight.detach().clone()
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (a, b))  # SGD: the step is the gradient
    for _ in range(2):
        dvpo.gvm_update(a, oa, batch, score, args)
        with torch.no_grad():
            v = b(batch)
        G = dvpo.td_lambda_targets(score, v, batch["response_mask"], args.gamma, 0.9)
        ppo.value_update(b, ob, batch, G, v, args, clip=0.0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert not torch.allclose(a.head.weight, head0, atol=1e-3)  # and they did move


def test_gvm_report_scores_v_s0_against_the_outcome():
    """V(s_0) = 0.1, 0.3, 0.35, 0.4 for outcomes 0, 1, 0, 1: MSE by hand, AUC 3 of 4 pairs, the constant 0.5's MSE."""
    seqs = [C.Rollout(0, [5], [i, 9], "", [0.0] * 2, "stop") for i in (2, 6, 7, 8)]
    fake_gvm = lambda b: b["response_ids"].float() / 20  # noqa: E731  V(s_0) = first response id / 20
    rep = dvpo.gvm_report(fake_gvm, seqs, torch.tensor([0.0, 1.0, 0.0, 1.0]), 0.5, dvpo.Args(), 0, "cpu")
    assert rep["gvm_heldout_mse"] == pytest.approx((0.01 + 0.49 + 0.1225 + 0.36) / 4)
    assert rep["gvm_heldout_auc"] == pytest.approx(0.75) and rep["gvm_heldout_const_mse"] == pytest.approx(0.25)


# ---------------------------------------------------------------- data


def test_readers_name_file_and_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "p", "response": "r", "score": 1}\n{"prompt": "p", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: 'score'"):
        dvpo.read_scored(f)
    f.write_text('{"prompt": "p", "response": "r", "score": 1, "response_ids": ["a"]}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: 'response_ids'"):
        dvpo.read_scored(f)
    f.write_text('{"prompt": "p", "response": "r", "score": NaN}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1"):
        dvpo.read_scored(f)
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "q", "chosen": "good", "rejected": "bad"}\n\n{"prompt": "q", "chosen": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: a pair needs"):
        dvpo.read_pairs(p)
    p.write_text('{"prompt": "q", "chosen": "good", "rejected": "bad"}\n')
    assert [(r["response"], r["score"]) for r in dvpo.read_pairs(p)] == [("good", 1.0), ("bad", -1.0)]
    assert [r["score"] for r in dvpo.read_pairs(p, 1.0, 0.0)] == [1.0, 0.0]


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(C.resolve_model("smollm2-135m"))


def test_to_sequence_uses_sampled_ids_and_closes_text_with_eos(smol_tok):
    eos = smol_tok.eos_token_id
    s = dvpo.to_sequence({"prompt": "What is 2 + 2?", "response": "4", "response_ids": [19, 7, eos]}, smol_tok, eos)
    assert s.ids == [19, 7, eos]  # the sampled ids, as they were, even if the text would tokenise differently
    assert s.prompt_ids == smol_tok(C.build_prompt(smol_tok, C.Problem("", "What is 2 + 2?", "")),
                                    add_special_tokens=False)["input_ids"]
    s = dvpo.to_sequence({"prompt": "q", "response": "The answer is 4"}, smol_tok, eos)
    assert s.ids == smol_tok("The answer is 4", add_special_tokens=False)["input_ids"] + [eos]
    s = dvpo.to_sequence({"prompt": "q", "response": "The answer", "finish": "length"}, smol_tok, eos)
    assert s.ids[-1] != eos  # a response cut at the length limit did not end


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    return run_script("dvpo.py", *argv, check=check)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stable(row):
    """A metrics row without its timings and memory, which differ run to run."""
    return {k: v for k, v in row.items() if not k.startswith("time_") and k not in {"peak_mem_gb", "eval_acc"}}


@pytest.fixture(scope="module")
def both_stages(module_dir):
    """`python dvpo.py` (no subcommand) on a tiny budget: stage 1 into OUT/gvm, then 2 policy steps."""
    out = module_dir("dvpo")
    run(*STAGE1, *STAGE2, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "3", "--out", str(out))
    return out


@pytest.mark.slow
def test_no_subcommand_runs_both_stages(both_stages):
    gvm = both_stages / "gvm"
    meta = json.loads((gvm / "gvm.json").read_text())
    assert meta["rows"] == 12 and meta["train_rows"] + meta["heldout_rows"] == 12 and meta["heldout_rows"] > 0
    assert len(rows(gvm / "rollouts.jsonl")) == 12
    g = rows(gvm / "metrics.jsonl")
    assert [x["step"] for x in g] == list(range(len(g))) and len(g) > 2
    assert g[1]["value_loss"] is not None and "gvm_heldout_mse" in g[-1]
    assert g[0]["gvm_rows"] == meta["train_rows"] and g[0]["time_collect"] > 0  # the 12 rollouts were sampled
    r = rows(both_stages / "metrics.jsonl")
    assert [x["step"] for x in r] == [0, 1, 2]
    for x in r[1:]:
        assert set(C.METRICS) <= set(x)
        for key in ("acc", "gvm_value_mean", "grad_norm", "baseline_mse", "rollouts"):
            assert x[key] is not None, key
        assert "explained_variance" in x  # null when the 4 outcomes are all equal (no variance to explain)
        assert x["rollouts"] == 4 and x["kl"] == 0.0  # rlvr default: no KL, no reference model


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rlvr", "paper"])
def test_train_keeps_the_gvm_frozen_and_feeds_gae_what_the_variant_says(both_stages, tmp_path, monkeypatch, variant):
    """train() itself, two steps, every rollout scored correct: the GVM it loads gets no gradient, no optimizer
    slot and no change; at step 1 GAE gets the raw values (rlvr) or the row-whitened ones (paper), the verifier's
    reward on the last token in rlvr only (paper: the KL reward alone, 0 at step 1 where pi = pi_ref), and the
    preset's lambda; paper's controller gets each step's mean summed KL per response, over its 4 responses."""
    seen, load, adamw, values_of = {}, dvpo.load_gvm, C.adamw, dvpo.response_values
    advantages, rewards_of, controller = dvpo.dvpo_advantages, dvpo.dvpo_rewards, dvpo.adaptive_kl

    def spy_values(v_all, batch, whiten=False):
        return seen.setdefault(("values", whiten), values_of(v_all, batch, whiten))

    def spy_rewards(score, mask, variant, logp=None, ref_logp=None, beta=0.0):
        seen.setdefault("logp", []).append((logp, ref_logp, mask, beta))
        return rewards_of(score, mask, variant, logp, ref_logp, beta)

    def spy_adv(*a):
        seen.setdefault("adv", a)  # step 1's
        return advantages(*a)

    def spy_kl(*a):
        seen.setdefault("kl", []).append(a)
        return controller(*a)
    monkeypatch.setattr(dvpo, "load_gvm", lambda *a: seen.setdefault("gvm", load(*a)))
    monkeypatch.setattr(C, "adamw", lambda params, lr: seen.setdefault("opt", adamw(list(params), lr)))
    monkeypatch.setattr(C, "score", lambda texts, answers: ([1.0] * len(texts), 0))
    monkeypatch.setattr(dvpo, "response_values", spy_values)
    monkeypatch.setattr(dvpo, "dvpo_advantages", spy_adv)
    monkeypatch.setattr(dvpo, "dvpo_rewards", spy_rewards)
    monkeypatch.setattr(dvpo, "adaptive_kl", spy_kl)
    dvpo.train(dvpo.Args(variant=variant, gvm=str(both_stages / "gvm"), data=EASY, max_new_tokens=12, steps=2,
                         prompts_per_step=2, group_size=2, eval_problems=0, seed=1, out=str(tmp_path)))
    gvm = seen["gvm"][0]
    assert all(p.grad is None and not p.requires_grad for p in gvm.parameters()) and not gvm.training
    assert {id(p) for g in seen["opt"].param_groups for p in g["params"]}.isdisjoint(map(id, gvm.parameters()))
    assert seen["opt"].state  # the policy did take its step
    saved = load_file(both_stages / "gvm" / "ckpt" / "gvm" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in gvm.state_dict().items() if k in saved)
    values, rewards, mask, gamma, lam, _ = seen["adv"]
    assert torch.equal(values, seen[("values", variant == "paper")]) and lam == dvpo.VARIANTS[variant]["lam"]
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask)), mask.sum(-1).long() - 1] = 1
    assert torch.equal(rewards, last if variant == "rlvr" else torch.zeros_like(mask))
    if variant == "rlvr":
        assert "kl" not in seen
        return
    for (beta, kl, n, target), (logp, ref_logp, m, used) in zip(seen["kl"], seen["logp"], strict=True):
        assert kl == pytest.approx(((logp - ref_logp) * m).sum(-1).mean().item()) and (n, target, beta) == (4, 6.0, used)
    assert seen["kl"][1][1] != 0 and seen["kl"][1][0] == controller(*seen["kl"][0])  # step 2: pi moved; beta chained


@pytest.mark.slow
def test_stage_2_resume_continues_exactly(both_stages, tmp_path):
    """The combined run as a crash right after stage 2's step 1 leaves it, resumed with no subcommand: stage 1 is
    skipped (finished), and stage 2 ends with the metrics and weights of the run in one go."""
    cut = rolled_back(both_stages, 1, tmp_path / "cut")
    gvm_hash = sha(cut / "gvm" / "ckpt" / "gvm" / "model.safetensors")
    gvm_log = (cut / "gvm" / "metrics.jsonl").read_text()
    p = run(*STAGE1, *STAGE2, "--steps", "2", "--resume", "--out", str(cut))
    assert "collect" not in p.stderr and (cut / "gvm" / "metrics.jsonl").read_text() == gvm_log
    assert sha(cut / "gvm" / "ckpt" / "gvm" / "model.safetensors") == gvm_hash
    assert [stable(x) for x in rows(cut / "metrics.jsonl")] == [stable(x) for x in rows(both_stages / "metrics.jsonl")]
    wa, wb = (load_file(o / "ckpt" / "policy" / "model.safetensors") for o in (both_stages, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_stage_1_resume_continues_exactly(both_stages, tmp_path):
    """Stage 1 as a crash right after its GVM step 2 (of 4) leaves it, resumed: the same GVM as in one go, trained on
    the same rows (not collected again)."""
    cut = rolled_back(both_stages / "gvm", 2, tmp_path / "gvm")
    p = run("pretrain", *STAGE1, *STAGE2, "--resume", "--out", str(cut))
    assert "collect" not in p.stderr
    a = load_file(cut / "ckpt" / "gvm" / "model.safetensors")
    b = load_file(both_stages / "gvm" / "ckpt" / "gvm" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed, straight = rows(cut / "metrics.jsonl"), rows(both_stages / "gvm" / "metrics.jsonl")
    assert [stable(x) for x in resumed] == [stable(x) for x in straight]


@pytest.mark.slow
def test_paper_variant_adapts_beta_and_resumes_exactly(both_stages, tmp_path):
    """The paper's setting runs (KL reward through a reference model) with its adaptive beta, and --resume carries
    beta and the reference (the initial policy) over."""
    paper = ["train", "--variant", "paper", "--gvm", str(both_stages / "gvm"), *STAGE2, "--oracle-k", "0",
             "--eval-problems", "0"]
    run(*paper, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "2", "--out", str(tmp_path / "paper"))
    r = rows(tmp_path / "paper" / "metrics.jsonl")
    # the adaptive beta: 0.2 at step 1; step 1's KL is 0 (pi = pi_ref), so its error clips at -0.2, over n = 4
    assert r[0]["kl_coef"] == 0.2 and r[1]["kl_coef"] == pytest.approx(0.2 * (1 - 0.2 * 4 / 1e4), abs=1e-6)
    assert r[1]["kl"] != 0.0 and r[0]["grad_norm"] > 0  # step 2: the KL the reward paid, logged (the loss has none)
    cut = rolled_back(tmp_path / "paper", 1, tmp_path / "cut")  # a crash after step 1, then --resume to 2
    run(*paper, "--steps", "2", "--resume", "--out", str(cut))
    assert [stable(x) for x in rows(cut / "metrics.jsonl")] == [stable(x) for x in r]


def test_pretrain_on_pairs_alone_with_the_official_batch_structure(tmp_path, monkeypatch):
    """Pairs alone train a GVM, and --gvm-batch-epochs / --gvm-minibatch reach each batch's update."""
    seen, update = [], dvpo.gvm_update

    def spy(gvm, optimizer, batch, score, args):
        seen.append((len(score), args.epochs, args.minibatch_size, args.gvm_lam))
        return update(gvm, optimizer, batch, score, args)
    monkeypatch.setattr(dvpo, "gvm_update", spy)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "chosen": f"\\boxed{{{a + 1}}}",
                                         "rejected": f"\\boxed{{{a}}}"}) + "\n" for a in range(4)))
    dvpo.pretrain(dvpo.Args(collect_problems=0, pairs=str(pairs), gvm_batch=4, gvm_batch_epochs=2, gvm_minibatch=2,
                            gvm_holdout=0.25, out=str(tmp_path / "gvm")))
    meta = json.loads((tmp_path / "gvm" / "gvm.json").read_text())
    assert meta["rows"] == 8 and meta["heldout_rows"] == 2 and meta["lam"] == 0.95
    assert seen == [(4, 2, 2, 0.95), (2, 2, 2, 0.95)]  # 6 training rows in batches of 4


def test_signal_measures_on_hand_made_responses():
    """benchmarks/dvpo_signal.py's measures: AUC of the mean advantage against the outcome, its correlation with
    length, the last token's advantage of stopped responses, and prompt-bootstrap intervals around them."""
    adv = T([2, 0, 7], [0.5, 0.5, 0.5], [-1, 7, 7], [-2, -2, 1])  # [B 4, L 3]; 7 sits on padding
    mask = T([1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1])
    sig = dvpo_signal.response_signal(adv, mask, T(1, 1, 0, 0), np.array([True, True, False, True]))
    assert sig["mean_adv"].tolist() == [1.0, 0.5, -1.0, -1.0] and sig["last_adv"].tolist() == [0.0, 0.5, -1.0, 1.0]
    m = dvpo_signal.measures(sig, np.arange(4))
    assert m["auc"] == 1.0  # the mean ranks both correct responses first (the last token alone would give 0.5)
    assert m["eos_adv"] == pytest.approx((0 + 0.5 + 1) / 3)  # the response cut at the length limit left out
    assert m["len_r"] == pytest.approx(np.corrcoef([1, 0.5, -1, -1], [2, 3, 1, 3])[0, 1])
    flipped = dvpo_signal.response_signal(-adv, mask, T(1, 1, 0, 0), np.ones(4, bool))
    assert dvpo_signal.measures(flipped, np.arange(4))["auc"] == 0.0  # pushing the wrong answers up reads < 0.5
    iv = dvpo_signal.with_intervals(sig, n_prompts=2, n=2, boot=200, seed=0)  # prompts: rows (0, 1) and (2, 3)
    assert iv["auc"][0] == 1.0 and iv["eos_adv"][1] <= iv["eos_adv"][0] <= iv["eos_adv"][2]


@pytest.mark.slow
def test_signal_benchmark_runs_on_a_gvm_and_writes_every_setting(both_stages, tmp_path):
    run_script("benchmarks/dvpo_signal.py", "--gvm", str(both_stages / "gvm"), "--data", EASY, "--problems", "3",
               "--n", "2", "--max-new-tokens", "12", "--boot", "50", "--out", str(tmp_path))
    res = json.loads((tmp_path / "signal.json").read_text())
    assert set(res["settings"]) == set(dvpo_signal.SETTINGS) and res["problems"] == 3 and res["n"] == 2
    assert set(res["last_value"]) == {f"{k}, {o}" for k in ("raw", "whitened") for o in ("correct", "wrong")}
    for name, m in res["settings"].items():
        assert set(m) == {"auc", "len_r", "eos_adv"} and all(len(v) == 3 for v in m.values()), name
    if 0 < res["success_rate"] < 1:  # both outcomes: rlvr's A_t = r - V_t ranks every correct response first
        assert res["settings"]["rlvr (dvpo.py's default)"]["auc"][0] > 0.9


@pytest.mark.slow
def test_missing_gvm_says_how_to_make_one(tmp_path):
    p = run("train", "--gvm", str(tmp_path / "nope"), "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "dvpo.py pretrain" in p.stderr
    p = run("fit", check=False)
    assert p.returncode != 0 and "unknown command" in p.stderr
