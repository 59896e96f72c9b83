"""poise.py: PCA and ridge against closed forms, the cross-rollout pairing, the baseline's independence from
the rollout's own features, unbiasedness (seeded simulation), the features, and the script end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
import poise
from conftest import ROOT

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
TINY = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "12", "--data", EASY,
        "--eval-problems", "2", "--warmup-steps", "1", "--rloo-steps", "2", "--seed", "1"]


# ---------------------------------------------------------------- PCA, standardisation, ridge


def test_pca_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 3.0  # correlated, off-centre
    mean, comp = poise.pca_fit(X, 3)
    evals, evecs = np.linalg.eigh(np.cov(X.T, bias=True))
    top = evecs[:, ::-1][:, :3].T  # [3, d], largest eigenvalue first
    assert np.allclose(mean, X.mean(0))
    assert np.allclose(np.abs(comp @ top.T), np.eye(3), atol=1e-8)  # same directions, up to sign
    assert np.allclose(((X - mean) @ comp.T).var(0), evals[::-1][:3])  # variance along each = eigenvalue
    assert poise.pca_fit(X[:5], 32)[1].shape == (4, 6)  # never more than rows - 1 components


def test_ridge_matches_the_normal_equations():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 8)), rng.normal(size=50)
    for alpha in (0.0, 1.0, 100.0):
        w, c = poise.ridge_fit(X, y, alpha)
        Xc, yc = X - X.mean(0), y - y.mean()
        w_ref = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(8), Xc.T @ yc)  # (X^T X + alpha I)^-1 X^T y, centred
        assert np.allclose(w, w_ref, atol=1e-10)
        assert np.isclose(c, y.mean() - X.mean(0) @ w_ref)
    big = poise.ridge_fit(X, y, 1e12)[0]
    assert np.abs(big).max() < 1e-9  # alpha -> inf: weights -> 0, prediction -> mean(y)


def test_standardize_keeps_flat_columns_finite():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    m, s = poise.standardize_fit(X)
    assert np.allclose(m, [2, 5]) and np.allclose(s, [1, 1])
    assert np.isfinite((X - m) / s).all()


def test_probe_learns_a_linear_signal_and_stays_in_0_1():
    rng = np.random.default_rng(2)
    d, N = 16, 400
    F = rng.normal(size=(N, 2 * d + 3)).astype(np.float32)
    p = 1 / (1 + np.exp(-2 * F[:, 0]))  # the success rate lives in one prompt direction
    probe = poise.fit_probe(F[:300], p[:300], d, prompt_pca=16, response_pca=8, alpha=10.0)
    pred = poise.probe_predict(probe, F[300:])
    assert pred.min() >= 0 and pred.max() <= 1
    assert poise.pearson(pred, p[300:]) > 0.9


# ---------------------------------------------------------------- the cross-rollout construction


def test_pairing_n2_and_n3():
    g2 = torch.tensor([[0.2, 0.7], [0.5, 0.1]])
    assert torch.allclose(poise.leave_one_out(g2), torch.tensor([[0.7, 0.2], [0.1, 0.5]]))  # A_1 = r_1 - g(z_2)
    r2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(poise.poise_advantages(r2, g2), torch.tensor([[0.3, -0.2], [0.9, 0.5]]))
    assert torch.allclose(poise.poise_advantages(r2), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))  # RLOO
    g3 = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(poise.leave_one_out(g3), torch.tensor([[4.0, 3.5, 1.5]]))
    r3 = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.allclose(poise.leave_one_out(r3), torch.tensor([[0.0, 0.5, 0.5]]))  # targets t_i
    with pytest.raises(ValueError, match="group-size"):
        poise.leave_one_out(torch.zeros(3, 1))


def test_baseline_of_rollout_i_ignores_its_own_features():
    rng = np.random.default_rng(3)
    d = 4
    probe = poise.fit_probe(rng.normal(size=(64, 2 * d + 3)), rng.random(64), d, 3, 3, alpha=1.0)
    F = rng.normal(size=(6, 2 * d + 3))  # 2 prompts x 3 rollouts
    base = lambda F: poise.leave_one_out(torch.tensor(poise.probe_predict(probe, F)).view(2, 3))  # noqa: E731
    b0 = base(F)
    F2 = F.copy()
    F2[1] += 5 * rng.normal(size=2 * d + 3)  # change rollout 1 of prompt 0 (its states, its entropies)
    b1 = base(F2)
    assert torch.equal(b1[0, 1], b0[0, 1])  # its own baseline does not move
    assert not torch.allclose(b1[0, [0, 2]], b0[0, [0, 2]])  # its siblings' baselines do
    assert torch.equal(b1[1], b0[1])  # other prompts are untouched


@pytest.mark.parametrize("n", [2, 3])
def test_cross_rollout_gradient_is_unbiased_and_a_same_rollout_baseline_is_not(n):
    """A softmax policy over 6 responses, 0/1 rewards, and a probe that reads each response's own outcome
    (as an answer-span entropy would): g(y) = 0.2 + 0.6 r(y). The true gradient of J = E[r] w.r.t. the logits
    is sum_y pi(y) r(y) (e_y - pi). Over 200k seeded prompts, mean_i A_i grad log pi(y_i) matches it within
    4 standard errors per coordinate with A_i = r_i - mean_{j != i} g(y_j); with the same-rollout baseline
    r_i - g(y_i) it is off by 0.6 x the gradient, far beyond 20 standard errors."""
    rng = np.random.default_rng(4)
    K, M = 6, 200_000
    logits = rng.normal(size=K)
    pi = np.exp(logits) / np.exp(logits).sum()
    r_of = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    g_of = 0.2 + 0.6 * r_of
    true = (pi * r_of)[:, None] * (np.eye(K) - pi)  # [K, K]: pi(y) r(y) (e_y - pi)
    true = true.sum(0)
    y = rng.choice(K, size=(M, n), p=pi)
    R, G = torch.tensor(r_of[y]), torch.tensor(g_of[y])
    score = np.eye(K)[y] - pi  # [M, n, K]: grad of log pi(y) w.r.t. the logits
    for adv, unbiased in ((poise.poise_advantages(R, G), True), (R - G, False)):
        per_prompt = (adv.numpy()[..., None] * score).mean(1)  # [M, K]: one gradient estimate per prompt
        est, se = per_prompt.mean(0), per_prompt.std(0) / np.sqrt(M)
        z = np.abs(est - true) / se
        if unbiased:
            assert z.max() < 4, z
        else:
            assert z.max() > 20, z


def test_fifo_drops_whole_oldest_groups():
    X, y = None, None
    for s in range(4):
        X, y = poise.fifo_append(X, y, np.full((4, 1), s), np.arange(4) + 10 * s, cap=7, n=2)
    assert len(y) == 6 and list(y) == [22, 23, 30, 31, 32, 33]  # 3 whole pairs, newest last
    assert (X[:, 0] == [2, 2, 3, 3, 3, 3]).all()


def test_a_group_with_a_non_finite_feature_is_kept_out_and_gets_rloo():
    F = np.ones((6, 3))
    F[3, 1] = np.nan  # rollout 1 of group 1 (n = 2)
    F[4, 0] = np.inf  # rollout 0 of group 2
    ok = poise.finite_groups(F, 2)
    assert ok.tolist() == [True, False, False]
    rewards, g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.3, 0.6], [float("nan"), 0.2], [0.5, 0.5]])
    adv = poise.poise_advantages(rewards, poise.probe_or_rloo(g, rewards, torch.from_numpy(ok)))
    assert torch.allclose(adv[0], torch.tensor([1 - 0.6, 0 - 0.3]))  # the probe's cross-rollout baseline
    assert torch.equal(adv[1:], poise.poise_advantages(rewards[1:]))  # RLOO: finite, whatever g said
    # and a probe refit on the finite groups alone stays finite
    X, y = poise.fifo_append(None, None, F[np.repeat(ok, 2)], np.arange(6.0)[np.repeat(ok, 2)], cap=8, n=2)
    assert np.isfinite(X).all() and y.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- features


def test_rollout_features_by_hand():
    B, P, L, d = 2, 5, 4, 3
    hidden = torch.arange(P + L, dtype=torch.float32)[None, :, None].expand(B, P + L, d).clone()  # state = column
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    cuts = (np.array([4, 2]), np.array([3, 4]), np.array([4, 3]))  # state_end, answer_start, n_text
    z = poise.rollout_features(hidden, entropy, P, np.array([3, 1]), cuts, last_n=2)
    assert z.shape == (2, 2 * d + 3)
    assert np.allclose(z[0, :d], 3.5) and np.allclose(z[1, :d], 4.0)  # last 2 (row 1: only 1) prompt columns
    assert np.allclose(z[0, d:2 * d], 7.5) and np.allclose(z[1, d:2 * d], 5.5)  # columns P+2, P+3 | P+0, P+1
    assert np.allclose(z[0, 2 * d:], [2.5, 2.0, 4.0])  # whole, reasoning [0, 3), answer [3, 4)
    assert np.allclose(z[1, 2 * d:], [6.0, 6.0, 0.0])  # the answer span is empty: 0, as in the release


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(C.resolve_model("smollm2-135m"))


def _rollout(tok, text, stop=True):
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])
    return C.Rollout(0, [1, 2], ids, text, [0.0] * len(ids), "stop" if stop else "length")


def test_response_cuts_at_think_and_at_boxed(smol_tok):
    think = _rollout(smol_tok, "Add them: 2 plus 2.</think> So \\boxed{4}")
    boxed = _rollout(smol_tok, "2 plus 2 makes 4, so \\boxed{4}", stop=False)
    plain = _rollout(smol_tok, "I do not know")
    state_end, answer_start, n_text = poise.response_cuts(smol_tok, [think, boxed, plain])
    assert list(n_text) == [len(think.ids) - 1, len(boxed.ids), len(plain.ids) - 1]  # eos is not text
    assert smol_tok.decode(think.ids[:state_end[0]]).endswith("</think>") and answer_start[0] == state_end[0]
    assert smol_tok.decode(boxed.ids[answer_start[1]:]).strip().startswith("\\boxed") and state_end[1] == n_text[1]
    assert answer_start[2] == state_end[2] == n_text[2]  # no marker: all reasoning, empty answer span


def test_hidden_layer_out_of_range_is_a_clear_error(tiny_lm):
    batch = C.collate([C.Rollout(0, [5, 6], [7, 8], "", [0.0, 0.0], "length")], 0)
    with pytest.raises(ValueError, match="decoder layers 1..2"):
        C.forward_logprobs(tiny_lm, batch, hidden_layer=3)


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "poise.py"), *argv], capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_group_of_one_is_refused(tmp_path):
    p = run("--group-size", "1", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "--group-size 1" in p.stderr


@pytest.fixture(scope="module")
def poise_run(module_dir):
    out = module_dir("poise")
    run(*TINY, "--oracle-k", "2", "--out", str(out))
    return out


def test_three_steps_log_the_poise_metrics(poise_run):
    r = rows(poise_run)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert r[1]["probe_r"] is None and r[1]["probe_mae"] is None  # no probe before the warm-up's refit
    for x in r[2:]:
        assert x["probe_mae"] is not None and x["oracle_probe_mae"] is not None
    assert [x["probe_used"] for x in r[1:]] == [0.0, 0.0, 1.0]  # RLOO for --rloo-steps 2, then the probe
    assert [x["buffer_rows"] for x in r[1:]] == [4, 8, 12]
    assert [x["nonfinite_groups"] for x in r[1:]] == [0, 0, 0]
    for x in r[1:]:
        for key in ("rollouts", "acc", "baseline_mse", "time_features"):
            assert x[key] is not None, key
    assert r[3]["grad_norm"] is not None  # a probe baseline in (0, 1) gives every row an advantage


def test_resume_continues_exactly(poise_run, tmp_path):
    """2 steps + --resume to 3 = 3 steps in one go: weights, optimizer, cursor and the probe's buffer come back."""
    run(*TINY[:1], "2", *TINY[2:], "--oracle-k", "2", "--out", str(tmp_path))
    run(*TINY, "--oracle-k", "2", "--resume", "--out", str(tmp_path))
    a, b = rows(poise_run), rows(tmp_path)
    volatile = {"time_gen", "time_train", "time_step", "time_features", "time_probe", "peak_mem_gb", "eval_acc"}
    keys = lambda x: {k: v for k, v in x.items() if k not in volatile}  # noqa: E731
    assert [keys(x) for x in a] == [keys(x) for x in b]
    wa, wb = (load_file(o / "ckpt" / "policy" / "model.safetensors") for o in (poise_run, tmp_path))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
