"""dvpo.py: TD(lambda) targets, the telescoping case, both reward settings, the data readers, a frozen GVM,
and both stages end to end with exact resume."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common as C
import dvpo
from conftest import ROOT

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
    A = dvpo.dvpo_advantages(V, r, mask, gamma=1.0, lam=1.0, whiten_values=False, whiten_adv=False)
    assert torch.allclose(A, -V * mask)
    # with a KL reward: A_t = (sum of the rewards from t on) - V_t
    ref = logp - T([0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0])
    r = dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "paper", logp, ref, beta=0.5)
    A = dvpo.dvpo_advantages(V, r, mask, gamma=1.0, lam=1.0, whiten_values=False, whiten_adv=False)
    assert torch.allclose(A, (r.flip(-1).cumsum(-1).flip(-1) - V) * mask)


def test_paper_signal_is_the_rise_of_the_value_when_lambda_below_1():
    """No reward: A_t = (1 - lambda) sum_{m>=1} lambda^(m-1) V_{t+m} - V_t (the docstring's identity)."""
    torch.manual_seed(1)
    L, lam = 6, 0.95
    V, mask = torch.randn(1, L), torch.ones(1, L)
    A = dvpo.dvpo_advantages(V, torch.zeros(1, L), mask, 1.0, lam, whiten_values=False, whiten_adv=False)[0]
    for t in range(L):
        want = (1 - lam) * sum(lam ** (m - 1) * V[0, t + m] for m in range(1, L - t)) - V[0, t]
        assert A[t].item() == pytest.approx(float(want), abs=1e-6)


def test_rlvr_rewards_add_the_outcome_and_lambda_1_gives_r_minus_v():
    V, mask = T([0.2, 0.4, 0.3], [0.6, 0.0, 0.0]), T([1, 1, 1], [1, 0, 0])
    r = dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "rlvr")
    assert r.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    A = dvpo.dvpo_advantages(V, r, mask, 1.0, 1.0, whiten_values=False, whiten_adv=False)
    assert torch.allclose(A, (T([1, 1, 1], [0, 0, 0]) - V) * mask)  # A_t = r - V(s_t): a baseline, unbiased
    assert dvpo.dvpo_rewards(torch.tensor([1.0, 0.0]), mask, "paper").abs().sum() == 0


def test_whitening_values_and_advantages():
    torch.manual_seed(2)
    V, mask = torch.rand(3, 5) * 4 + 2, T([1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0])
    A = dvpo.dvpo_advantages(V, torch.zeros(3, 5), mask, 1.0, 0.95, whiten_values=True, whiten_adv=True)
    assert C.masked_mean(A, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert C.masked_mean(A ** 2, mask).item() == pytest.approx(1.0, abs=0.15)  # unit variance (unbiased var)
    assert torch.all(A[mask == 0] == 0)
    # whitening V is shift- and scale-free: V and 3V + 7 give the same whitened advantages
    B = dvpo.dvpo_advantages(3 * V + 7, torch.zeros(3, 5), mask, 1.0, 0.95, whiten_values=True, whiten_adv=True)
    assert torch.allclose(A, B, atol=1e-5)


def test_realised_returns_discount_from_the_end():
    mask = T([1, 1, 1], [1, 1, 0])
    R = dvpo.realised_returns(torch.tensor([1.0, 2.0]), mask, gamma=0.5)
    assert torch.allclose(R, T([0.25, 0.5, 1.0], [1.0, 2.0, 0.0]))


def test_gvm_update_equals_targets_from_a_separate_no_grad_pass(tiny_lm):
    """Bootstrapping on the detached values of the same forward = targets from a no-grad pass first."""
    import copy
    rolls = [C.Rollout(0, [5, 6, 7][: 1 + i % 3], [10 + i, 11, 12, 13][: 2 + i % 3], "", [0.0] * 4, "stop")
             for i in range(5)]
    batch, score = C.collate(rolls, pad_id=0), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    args = dvpo.Args(micro_batch_size=2, gamma=1.0, lam=0.9)
    a = C.ValueModel(tiny_lm)
    torch.nn.init.normal_(a.head.weight, std=0.5)  # non-zero values, so the bootstrap matters
    b, head0 = copy.deepcopy(a), a.head.weight.detach().clone()
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (a, b))  # SGD: the step is the gradient
    for _ in range(2):
        dvpo.gvm_update(a, oa, batch, score, args)
        with torch.no_grad():
            v = b(batch)
        G = dvpo.td_lambda_targets(score, v, batch["response_mask"], args.gamma, args.lam)
        C.value_update(b, ob, batch, G, v, args, clip=0.0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert not torch.allclose(a.head.weight, head0, atol=1e-3)  # and they did move


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


def test_split_by_prompt_keeps_a_prompt_on_one_side():
    rows = [{"prompt": f"q{i % 8}"} for i in range(40)]
    train, held = dvpo.split_by_prompt(rows, 0.25, seed=0)
    assert sorted(train + held) == list(range(40))
    assert len({rows[i]["prompt"] for i in held}) == 2
    assert not {rows[i]["prompt"] for i in held} & {rows[i]["prompt"] for i in train}


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "dvpo.py"), *argv], capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def both_stages(module_dir):
    """`python dvpo.py` (no subcommand) on a tiny budget: stage 1 into OUT/gvm, then 2 policy steps."""
    out = module_dir("dvpo")
    run(*STAGE1, *STAGE2, "--steps", "2", "--out", str(out))
    return out


def test_no_subcommand_runs_both_stages(both_stages):
    gvm = both_stages / "gvm"
    meta = json.loads((gvm / "gvm.json").read_text())
    assert meta["rows"] == 12 and meta["train_rows"] + meta["heldout_rows"] == 12 and meta["heldout_rows"] > 0
    assert len(rows(gvm / "rollouts.jsonl")) == 12
    g = rows(gvm / "metrics.jsonl")
    assert [x["step"] for x in g] == list(range(len(g))) and len(g) > 2
    assert g[1]["value_loss"] is not None and "gvm_heldout_mse" in g[-1]
    r = rows(both_stages / "metrics.jsonl")
    assert [x["step"] for x in r] == [0, 1, 2]
    for x in r[1:]:
        assert set(C.METRICS) <= set(x)
        for key in ("acc", "gvm_value_mean", "grad_norm", "baseline_mse", "rollouts"):
            assert x[key] is not None, key
        assert "explained_variance" in x  # null when the 4 outcomes are all equal (no variance to explain)
        assert x["rollouts"] == 4 and x["kl"] == 0.0  # rlvr default: no KL, no reference model


def test_gvm_is_frozen_in_stage_2(both_stages, smol_tok):
    """No gradient, no optimizer state, no change: the GVM's file is the one stage 1 wrote."""
    state = torch.load(both_stages / "ckpt" / "state.pt", weights_only=False)
    assert set(state["optimizers"]) == {"policy"} and state["extra"]["gvm"] == str(both_stages / "gvm")
    assert not (both_stages / "ckpt" / "gvm").exists()  # the checkpoint carries the policy only
    gvm, _ = dvpo.load_gvm(both_stages / "gvm", smol_tok, "cpu", torch.float32)
    assert not any(p.requires_grad for p in gvm.parameters()) and not gvm.training
    policy, _, _ = C.load_model("smollm2-135m")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    assert {id(p) for g in opt.param_groups for p in g["params"]}.isdisjoint({id(p) for p in gvm.parameters()})
    roll = [C.Rollout(0, [1, 2, 3], [5, 6, 7], "", [-1.0] * 3, "stop"), C.Rollout(0, [1, 2], [8, 9], "", [-1.0] * 2, "stop")]
    batch = C.collate(roll, smol_tok.pad_token_id)
    values = C.masked_whiten(gvm(batch), batch["response_mask"])
    adv = dvpo.dvpo_advantages(values, torch.zeros_like(values), batch["response_mask"])
    C.policy_update(policy, opt, batch, adv, dvpo.Args(micro_batch_size=2))
    assert all(p.grad is None for p in gvm.parameters())
    assert opt.state  # the policy did take its step


def test_stage_2_resume_continues_exactly(both_stages, tmp_path):
    """Combined run: 2 steps, then --resume to 3 (stage 1 is skipped: finished) = `train --gvm` 3 steps straight."""
    resumed = tmp_path / "resumed"
    shutil.copytree(both_stages, resumed)
    gvm_hash = sha(resumed / "gvm" / "ckpt" / "gvm" / "model.safetensors")
    gvm_log = (resumed / "gvm" / "metrics.jsonl").read_text()
    p = run(*STAGE1, *STAGE2, "--steps", "3", "--resume", "--out", str(resumed))
    assert "collect" not in p.stderr and (resumed / "gvm" / "metrics.jsonl").read_text() == gvm_log
    assert sha(resumed / "gvm" / "ckpt" / "gvm" / "model.safetensors") == gvm_hash
    straight = tmp_path / "straight"
    run("train", "--gvm", str(resumed / "gvm"), *STAGE2, "--steps", "3", "--out", str(straight))
    volatile = {"time_gen", "time_train", "time_step", "peak_mem_gb", "eval_acc"}
    keys = lambda x: {k: v for k, v in x.items() if k not in volatile}  # noqa: E731
    assert [keys(x) for x in rows(resumed / "metrics.jsonl")] == [keys(x) for x in rows(straight / "metrics.jsonl")]
    wa, wb = (load_file(o / "ckpt" / "policy" / "model.safetensors") for o in (resumed, straight))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stage_1_resume_continues_exactly(both_stages, tmp_path):
    """Stage 1 for 1 pass with a checkpoint every step, then --resume to 2 passes = the 2-pass GVM above."""
    run("pretrain", *STAGE1, "--gvm-epochs", "1", "--save-every", "1", "--out", str(tmp_path))
    run("pretrain", *STAGE1, "--gvm-epochs", "2", "--resume", "--out", str(tmp_path))
    a = load_file(tmp_path / "ckpt" / "gvm" / "model.safetensors")
    b = load_file(both_stages / "gvm" / "ckpt" / "gvm" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "rollouts.jsonl") == rows(both_stages / "gvm" / "rollouts.jsonl")


def test_paper_variant_and_pairs(both_stages, tmp_path):
    """The paper's reward setting runs (KL reward through a reference model); pairs alone can train a GVM."""
    run("train", "--variant", "paper", "--gvm", str(both_stages / "gvm"), *STAGE2, "--steps", "2", "--oracle-k", "0",
        "--eval-problems", "0", "--out", str(tmp_path / "paper"))
    r = rows(tmp_path / "paper" / "metrics.jsonl")
    assert r[0]["kl"] == 0.0 and r[0]["grad_norm"] > 0  # step 1: the policy is still the reference
    assert r[1]["kl"] != 0.0  # step 2: the KL the reward paid, logged (not the loss's KL, which is 0 here)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "chosen": f"\\boxed{{{a + 1}}}",
                                         "rejected": f"\\boxed{{{a}}}"}) + "\n" for a in range(4)))
    run("pretrain", "--collect-problems", "0", "--pairs", str(pairs), "--gvm-batch", "4", "--gvm-holdout", "0.25",
        "--out", str(tmp_path / "gvm"))
    meta = json.loads((tmp_path / "gvm" / "gvm.json").read_text())
    assert meta["rows"] == 8 and meta["heldout_rows"] == 2


def test_missing_gvm_says_how_to_make_one(tmp_path):
    p = run("train", "--gvm", str(tmp_path / "nope"), "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "dvpo.py pretrain" in p.stderr
    p = run("fit", check=False)
    assert p.returncode != 0 and "unknown command" in p.stderr
