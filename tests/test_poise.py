"""poise.py: PCA and ridge against closed forms, the cross-rollout pairing, the baseline's independence from
the rollout's own features, unbiasedness and the sibling target's lower variance (seeded simulations), the
layer the probe reads, the release's spans, the presets, bad flags, and the script end to end."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
import poise
from conftest import ROOT, run_script, TinyTok, rolled_back

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
TINY = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "12", "--data", EASY,
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
    assert C.pearson(pred, p[300:]) > 0.9


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


@pytest.mark.parametrize("n", [2, 3])
def test_both_targets_are_unbiased_and_the_sibling_target_has_the_lower_variance(n):
    """Why the probe learns t_i. 4 prompts, each a softmax over 6 responses with 0/1 rewards; a rollout's z is
    [one-hot prompt | its own reward in the response part and in H_answer] (the own-outcome signal an
    answer-span entropy carries). fit_probe on 4000 earlier groups, to t_i (the release) or to each row's own
    r_i; then on 100k fresh groups A_i = r_i - mean_{j != i} g(z_j). Both gradients match the true one within 4
    standard errors per coordinate. E[A^2] is lower with t_i by more than 20 standard errors of the paired
    difference, and own / sibling = n / (n-1) within 5%: fit to r_i, g(z) = r (b_i is RLOO's); fit to t_i,
    g(z) = p(x), and E[A^2] = E[(r - p)^2] + E[(b - p)^2]."""
    rng = np.random.default_rng(11)
    M, K, d = 4, 6, 4
    logits = rng.normal(size=(M, K))
    pi = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # [M, K]
    r_of = np.array([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 0, 1, 0, 0, 1]], float)

    def groups(G):  # -> prompt [G], response [G, n], rewards [G, n], z [G * n, 2d + 3]
        x = rng.integers(M, size=G)
        y = (rng.random((G, n, 1)) > pi[x].cumsum(-1)[:, None, :]).sum(-1).clip(max=K - 1)
        r = r_of[x[:, None], y]
        z = np.zeros((G, n, 2 * d + 3))
        z[np.arange(G), :, x] = 1.0
        z[..., d], z[..., -1] = r, r
        return x, y, r, z.reshape(G * n, -1)

    _, _, r_fit, z_fit = groups(4000)
    probes = {"sibling": poise.fit_probe(z_fit, poise.leave_one_out(torch.tensor(r_fit)).flatten().numpy(), d,
                                         alpha=1.0),
              "own": poise.fit_probe(z_fit, r_fit.flatten(), d, alpha=1.0)}
    G = 100_000
    x, y, r, z = groups(G)
    true = ((pi * r_of)[:, :, None] * (np.eye(K)[None] - pi[:, None, :])).sum(1) / M  # [M, K]
    score = np.eye(K)[y] - pi[x][:, None, :]  # [G, n, K]: grad of log pi_x(y) w.r.t. prompt x's logits
    sq = {}
    for name, probe in probes.items():
        g = torch.tensor(poise.probe_predict(probe, z)).view(G, n)
        adv = poise.poise_advantages(torch.tensor(r), g).numpy()  # [G, n]
        est = np.zeros((G, M, K))
        est[np.arange(G), x] = (adv[..., None] * score).mean(1)  # one gradient estimate per group
        zscore = np.abs(est.mean(0) - true) / (est.std(0) / np.sqrt(G))
        assert zscore.max() < 4, (name, zscore)
        sq[name] = (adv ** 2).mean(1)  # [G]
    diff = sq["own"] - sq["sibling"]
    assert diff.mean() > 20 * diff.std() / np.sqrt(G)
    assert sq["own"].mean() / sq["sibling"].mean() == pytest.approx(n / (n - 1), rel=0.05)


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


def test_one_step_fits_the_probe_to_the_siblings_rewards_and_uses_it_after_rloo():
    """cross_rollout_step, what main runs each step: the buffer rows are (z_i, t_i) with t_i the siblings' mean
    reward, never r_i; A uses the probe's cross-rollout baseline only when use_probe, else RLOO."""
    rng = np.random.default_rng(5)
    d, n = 3, 3
    probe = poise.fit_probe(rng.normal(size=(40, 2 * d + 3)), rng.random(40), d, 2, 2, alpha=1.0)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    feats = rng.normal(size=(6, 2 * d + 3)).astype(np.float32)
    g = torch.tensor(poise.probe_predict(probe, feats), dtype=torch.float32).view(2, n)
    adv, g_out, t, ok, (X, y) = poise.cross_rollout_step(rewards, feats, probe, use_probe=True)
    assert torch.allclose(t, torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 1.0]]))
    assert np.array_equal(X, feats) and np.allclose(y, [0.0, 0.5, 0.5, 0.5, 0.5, 1.0]) and ok.all()
    assert torch.allclose(g_out, g) and torch.allclose(adv, rewards - poise.leave_one_out(g))
    adv_rloo, *_ = poise.cross_rollout_step(rewards, feats, probe, use_probe=False)
    assert torch.allclose(adv_rloo, rewards - t)  # RLOO: b_i = t_i
    adv0, g0, *_ = poise.cross_rollout_step(rewards, feats, None, use_probe=True)  # no probe yet: RLOO
    assert g0 is None and torch.equal(adv0, adv_rloo)
    feats[4, 0] = np.nan  # group 1 is no longer finite: out of the buffer, RLOO's baseline
    adv, _, _, ok, (X, y) = poise.cross_rollout_step(rewards, feats, probe, use_probe=True)
    assert ok.tolist() == [True, False] and len(X) == 3 and np.allclose(y, [0.0, 0.5, 0.5])
    assert torch.allclose(adv[1], rewards[1] - t[1])


def test_pearson_and_its_null_without_spread():
    assert C.pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 6, 8.5])[0, 1])
    assert C.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(C.pearson([1, 1, 1], [0, 1, 2])) and np.isnan(C.pearson([1.0], [2.0]))
    assert np.isnan(C.pearson([1, 2, 3], [0.3, 0.3 + 1e-14, 0.3]))  # float noise is no spread (null, not r)


# ---------------------------------------------------------------- features


def test_rollout_features_by_hand():
    B, P, L, d = 2, 5, 4, 3
    hidden = torch.arange(P + L, dtype=torch.float32)[None, :, None].expand(B, P + L, d).clone()  # state = column
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    m = lambda *rows: np.array(rows, dtype=bool)  # noqa: E731
    spans = (np.array([4, 2]), m([1, 1, 1, 1], [1, 1, 1, 0]),  # state_end; whole (row 1: 3 tokens)
             m([0, 1, 1, 0], [1, 1, 1, 0]), m([0, 0, 0, 1], [0, 0, 0, 0]))  # reasoning; answer (row 1: empty)
    z = poise.rollout_features(hidden, entropy, P, np.array([3, 1]), spans, last_n=2)
    assert z.shape == (2, 2 * d + 3)
    assert np.allclose(z[0, :d], 3.5) and np.allclose(z[1, :d], 4.0)  # last 2 (row 1: only 1) prompt columns
    assert np.allclose(z[0, d:2 * d], 7.5) and np.allclose(z[1, d:2 * d], 5.5)  # columns P+2, P+3 | P+0, P+1
    assert np.allclose(z[0, 2 * d:], [2.5, 2.5, 4.0])  # whole, reasoning {1, 2}, answer {3}
    assert np.allclose(z[1, 2 * d:], [6.0, 6.0, 0.0])  # the answer span is empty: 0, as in the release


@pytest.mark.parametrize("text,reasoning,answer", [
    ("<think>\n Add them. \n</think>\n\nIt is <answer> 4 </answer>", "Add them.", "4"),  # the release's tags
    ("<think>a</think> b </think>  c", "a", "b </think>  c"),  # the answer starts after the first </think>
    ("<THINK>a</THINK> b", "a", None),  # the tag pairs match in any case, a lone </think> only in lower case
    ("<think>a</think>\n", "a", None),  # nothing after </think>
    ("</think> 4", None, "4"),  # no <think>: no reasoning span
    ("<answer>1</answer> then <answer>2</answer>", None, "1"),  # the first <answer>
    ("<think>still thinking", None, None),  # truncated: the release's spans are both empty
    ("2 plus 2 is 4, so \\boxed{4}", "2 plus 2 is 4, so ", "\\boxed{4}"),  # no tags at all: ours
    ("I do not know", "I do not know", None),
])
def test_text_spans(text, reasoning, answer):
    spans = poise.text_spans(text)
    assert [None if s is None else text[s[0]:s[1]] for s in spans] == [reasoning, answer]


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(C.resolve_model("smollm2-135m"))


def _rollout(tok, text, stop=True):
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])
    return C.Rollout(0, [1, 2], ids, text, [0.0] * len(ids), "stop" if stop else "length")


def test_response_spans_count_eos_and_follow_the_tags(smol_tok):
    tags = _rollout(smol_tok, "<think>\nAdd 2 and 2.\n</think>\nThe answer is <answer> 4 </answer>")
    plain = _rollout(smol_tok, "2 plus 2 makes 4, so \\boxed{4}", stop=False)
    mid = C.Rollout(0, [1], [*smol_tok("I do")["input_ids"], smol_tok.eos_token_id, *smol_tok(" not")["input_ids"]],
                    "", [0.0] * 4, "length")  # a special token inside the text decodes to nothing
    rolls = [tags, plain, mid]
    L = max(len(r.ids) for r in rolls)
    state_end, whole, reasoning, answer = poise.response_spans(smol_tok, rolls, L)
    text = lambda b, mask: smol_tok.decode(np.array(rolls[b].ids)[mask[b, :len(rolls[b].ids)]])  # noqa: E731
    assert whole.sum(1).tolist() == [len(r.ids) for r in rolls]  # every generated token, eos included
    assert not whole[1, len(plain.ids):].any()  # padding is in no span
    assert text(0, reasoning) == "Add 2 and 2." and text(0, answer) == "4"
    assert smol_tok.decode(tags.ids[:state_end[0]]).endswith("</think>")  # states up to and with </think>
    assert text(1, reasoning).startswith("2 plus") and text(1, answer).strip() == "\\boxed{4}"  # ours, no tags
    assert state_end[1] == len(plain.ids) and state_end[2] == len(mid.ids)  # no </think>: every token
    assert reasoning[2].tolist() == [True, True, False, True] + [False] * (L - 4)  # the empty piece is in no span
    stop = _rollout(smol_tok, "I do not know")
    end, whole, reasoning, _ = poise.response_spans(smol_tok, [stop], len(stop.ids))
    assert end[0] == len(stop.ids) and whole[0].all() and not reasoning[0, -1]  # eos: in the whole and the states


class _Tok(TinyTok):
    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s, skip_special_tokens) for s in seqs]


@pytest.mark.slow
@pytest.mark.parametrize("layer", [1, 2])
def test_features_read_the_output_of_model_layers_at_probe_layer(layer):
    """--probe-layer l reads model.layers[l] (the release's layer_index): transformers' hidden_states[l + 1],
    for the last --last-n prompt states and the last response states (eos included). A 4-layer model, so
    hidden_states[l] and [l + 2] are other blocks' outputs (and differ: an off-by-one fails)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=1)).float().eval()
    rolls = [C.Rollout(0, [5, 6, 7, 8], [11, 12, 13, 1], "", [0.0] * 4, "stop"),
             C.Rollout(1, [9, 10], [14, 15], "", [0.0] * 2, "length")]
    batch = C.collate(rolls, 0)
    args = poise.Args(probe_layer=layer, last_n=2, micro_batch_size=1)
    z, logp = poise.features_pass(model, batch, rolls, _Tok(), args)
    with torch.no_grad():
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], output_hidden_states=True).hidden_states
    P, d = batch["prompt_len"], 16

    def expected(h):  # [B, 2d]: last 2 prompt states | last 2 response states
        return torch.cat([h[:, P - 2:P].mean(1), torch.stack([h[0, P + 2:P + 4].mean(0), h[1, P:P + 2].mean(0)])], 1)
    assert np.allclose(z[:, :2 * d], expected(hs[layer + 1]).numpy(), atol=1e-5)
    for other in (layer, layer + 2):
        assert not np.allclose(z[:, :2 * d], expected(hs[other]).numpy(), atol=1e-3)
    assert torch.allclose(logp, C.forward_logprobs(model, batch, args.temperature)["logp"], atol=1e-6)  # pi_old


def test_probe_layer_index_and_its_errors():
    assert poise.probe_layer_index(-1, 36) == 19  # Qwen3-4B: the release's layer_index
    assert poise.probe_layer_index(-1, 30) == 16 and poise.probe_layer_index(-1, 2) == 1
    assert poise.probe_layer_index(-1, 1) == 0 and poise.probe_layer_index(5, 36) == 5
    with pytest.raises(ValueError, match=r"--probe-layer 36: .*model.layers\[0..35\]"):
        poise.probe_layer_index(36, 36)


def test_hidden_layer_out_of_range_is_a_clear_error(tiny_lm):
    batch = C.collate([C.Rollout(0, [5, 6], [7, 8], "", [0.0, 0.0], "length")], 0)
    with pytest.raises(ValueError, match="decoder layers 1..2"):
        C.forward_logprobs(tiny_lm, batch, hidden_layer=3)


# ---------------------------------------------------------------- flags


def test_presets_give_the_same_run_from_python_and_the_command_line():
    paper = poise.Args(preset="paper")
    assert (paper.prompts_per_step, paper.group_size, paper.minibatch_size, paper.temperature, paper.lr,
            paper.eps_low, paper.eps_high, paper.dual_clip, paper.loss_agg, paper.kl_coef, paper.epochs,
            paper.max_grad_norm) == (256, 2, 64, 1.0, 1e-6, 0.2, 0.28, 10.0, "token-mean", 0.0, 1, 1.0)  # the release
    cpu = poise.Args()
    assert (cpu.prompts_per_step, cpu.minibatch_size, cpu.temperature, cpu.lr, cpu.eps_high, cpu.dual_clip,
            cpu.probe_layer) == (8, 0, 0.7, 3e-5, 0.2, 0.0, -1)  # the CPU default run's
    assert C.parse_args(poise.Args, ["--preset", "paper"]) == paper and C.parse_args(poise.Args, []) == cpu
    mixed = C.parse_args(poise.Args, ["--preset", "paper", "--lr", "2e-6", "--dual-clip", "0"])
    assert mixed == dataclasses.replace(paper, lr=2e-6, dual_clip=0.0)
    assert mixed == poise.Args(preset="paper", lr=2e-6, dual_clip=0.0)  # an explicit value wins over the preset


@pytest.mark.parametrize("flags,message", [
    (dict(group_size=1), "--group-size must be >= 2"), (dict(probe_layer=-2), "--probe-layer must be"),
    (dict(last_n=0), "--last-n must be"), (dict(response_pca=0), "--response-pca must be"),
    (dict(ridge_alpha=0.0), "--ridge-alpha must be > 0"), (dict(buffer=2, group_size=3), "--buffer must hold"),
    (dict(rloo_steps=-1), "--rloo-steps must be"), (dict(preset="gpu"), "--preset must be one of"),
])
def test_bad_flags_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        poise.Args(**flags)


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    return run_script("poise.py", *argv, check=check)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_group_of_one_is_refused(tmp_path):
    p = run("--group-size", "1", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "--group-size must be >= 2" in p.stderr and not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def poise_run(module_dir):
    out = module_dir("poise")
    run(*TINY, "--oracle-k", "2", "--save-every", "2", "--keep-checkpoints", "2", "--out", str(out))
    return out


@pytest.mark.slow
def test_three_steps_log_the_poise_metrics(poise_run):
    r = rows(poise_run)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert r[1]["probe_r"] is None and r[1]["probe_mae"] is None  # no probe before the warm-up's refit
    for x in r[2:]:
        assert x["probe_mae"] is not None and x["oracle_probe_mae"] is not None
    assert [x["probe_used"] for x in r[1:]] == [0.0, 0.0, 1.0]  # RLOO for --rloo-steps 2, then the probe
    assert [x["buffer_rows"] for x in r[1:]] == [6, 12, 18]
    assert [x["nonfinite_groups"] for x in r[1:]] == [0, 0, 0]
    for x in r[1:]:
        for key in ("rollouts", "acc", "baseline_mse", "time_features"):
            assert x[key] is not None, key
    assert r[3]["grad_norm"] is not None  # a probe baseline in (0, 1) gives every row an advantage


@pytest.mark.slow
def test_the_run_trains_the_probe_on_the_siblings_rewards(poise_run):
    """main's buffer holds t_i, not r_i: with n = 3, t_i = (S - r_i) / 2 for the group's reward sum S, so
    r_i = S - 2 t_i must be 0 or 1 (with r_i stored instead, a group [1, 0, 0] decodes to [-1, 1, 1]); the run
    has a group with mixed rewards, or the check could not tell."""
    y = np.asarray(C.read_state(poise_run / "ckpt" / "state.pt")["extra"]["buffer_y"]).reshape(-1, 3)
    r = y.sum(1, keepdims=True) - 2 * y
    assert np.isin(r.round(6), [0.0, 1.0]).all(), r
    assert ((r.min(1) == 0) & (r.max(1) == 1)).any()


@pytest.mark.slow
def test_resume_continues_exactly(poise_run, tmp_path):
    """The 3-step run as a crash right after step 2 leaves it, resumed: the same metrics and weights as in one go
    (weights, optimizer, cursor and the probe's buffer come back)."""
    cut = rolled_back(poise_run, 2, tmp_path / "cut")
    run(*TINY, "--oracle-k", "2", "--resume", "--out", str(cut))
    a, b = rows(poise_run), rows(cut)
    volatile = {"time_gen", "time_train", "time_step", "time_features", "time_probe", "peak_mem_gb"}
    keys = lambda x: {k: v for k, v in x.items() if k not in volatile}  # noqa: E731
    assert [keys(x) for x in a] == [keys(x) for x in b]
    wa, wb = (load_file(o / "ckpt" / "policy" / "model.safetensors") for o in (poise_run, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_poise_vs_critic_summarises_the_seeds_it_finds_with_t_intervals(tmp_path):
    """The seed files already there are read, not re-run (nothing here loads a model), and the summary is each
    estimator's mean with Student's t interval (t_{0.975, 2} = 4.303), plus the paired difference probe - critic."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import poise_vs_critic as bench
    r = {"probe": [0.5, 0.6, 0.7], "critic": [0.7, 0.7, 0.7]}
    settings = {"model": "smollm2-135m", "train_prompts": 128, "heldout": 128, "oracle_k": 12, "critic_epochs": 3,
                "critic_lr": 1e-4, "max_new_tokens": 48, "temperature": 0.7}  # the defaults
    for seed in range(3):
        res = {name: {"pearson_r": r[name][seed], "mae": 0.15} for name in r} | {"train mean": {"pearson_r": None,
                                                                                                "mae": 0.2}}
        (tmp_path / f"seed{seed}.json").write_text(json.dumps({"settings": settings, **res}))
    with pytest.raises(SystemExit, match=r"--oracle-k 12 \(saved\) -> 4 \(now\)"):
        bench.main(["--oracle-k", "4", "--out", str(tmp_path)])  # a seed measured otherwise is not mixed in
    summary = bench.main(["--seeds", "0,1,2", "--out", str(tmp_path)])
    m, lo, hi = summary["probe"]["pearson_r"]
    assert m == pytest.approx(0.6) and hi - m == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3) and m - lo == hi - m
    assert summary["probe - critic"]["pearson_r"] == pytest.approx([-0.1, lo - 0.7, hi - 0.7])
    assert summary["critic"]["mae"] == pytest.approx([0.15, 0.15, 0.15])  # no spread: a zero-width interval
    assert json.loads((tmp_path / "summary.json").read_text())["train mean"]["mae"][0] == pytest.approx(0.2)
