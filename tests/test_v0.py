"""v0.py: the adapter, the loss, the in-context head, the loaders, budget allocation; and the programs around it
(benchmarks/v0_collect.py, v0_eval.py, v0_grpo.py, v0_route.py: their functions, and each run end to end on a tiny
budget)."""
import json
import math
import sys

import numpy as np
import pytest
import torch

import common as C
import grpo
import v0
import v05
from conftest import ROOT, run_script, SHARED

sys.path.insert(0, str(ROOT / "benchmarks"))
import v0_eval  # noqa: E402
import v0_grpo  # noqa: E402
import v0_route  # noqa: E402

V0_DATA = SHARED / "data" / "v0"


def run(script, *args, check=True):
    """python SCRIPT ARGS from the repository root (SCRIPT: v0.py or benchmarks/v0_*.py), in this process."""
    return run_script(script, *args, check=check)


# ------------------------------------------------------------------------------------------------ model


def test_adapter_offset_starts_at_zero_and_learns():
    torch.manual_seed(0)
    ad = v0.DynamicQueryAdapter(d=16, K=5, e=6, heads=3)
    pooled = torch.randn(4, 16)
    q = ad.queries(pooled)  # [N, K, e]
    assert q.shape == (4, 5, 6)
    assert torch.equal(q, ad.static_queries.expand(4, 5, 6))  # q(x) = q_0 at init, for every prompt
    H, mask = torch.randn(4, 7, 16), torch.ones(4, 7, dtype=torch.bool)
    mask[0, 5:] = False
    z = ad(H, mask, pooled)
    assert z.shape == (4, 5 * 6)
    z.pow(2).sum().backward()
    assert ad.offset[-1].weight.grad.abs().sum() > 0  # the zero-initialised layer still gets a gradient
    # padding is ignored: changing a padded token changes nothing
    H2 = H.clone()
    H2[0, 6] += 100
    assert torch.allclose(ad.eval()(H2, mask, pooled)[0], ad(H, mask, pooled)[0], atol=1e-6)
    Hp, mp = v0.pad_states([torch.ones(2, 3), torch.ones(3, 3)])  # right-padded with zeros, mask True on tokens
    assert Hp.shape == (2, 3, 3) and mp.tolist() == [[True, True, False], [True] * 3] and Hp[0, 2].abs().sum() == 0
    # z = MHA(LN(q(x)), LN(W_kv H), W_kv H): LayerNorm on queries and keys, not on values
    with torch.no_grad():
        ad.offset[-1].weight.normal_()  # a nonzero offset, so q(x) differs per prompt
        kv = ad.proj_kv(H[1:2])
        want = ad.mha(ad.ln_q(ad.queries(pooled[1:2])), ad.ln_kv(kv), kv)[0].flatten()
        assert torch.allclose(ad(H[1:2], mask[1:2], pooled[1:2])[0], want, atol=1e-6)
        assert not torch.allclose(ad.queries(pooled[:1]), ad.queries(pooled[1:2]))


def test_ranking_loss_hand_made_pair():
    # s = logit_1 - logit_0: success scores 1, failure scores 0 -> -log sigma(1 - 0) = log(1 + e^-1)
    logits = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert v0.ranking_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    # the wrong order costs more: -log sigma(0 - 1) = log(1 + e)
    assert v0.ranking_loss(logits, torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log1p(math.e), abs=1e-6)
    # labels binarised at 0.5: 0.6 is a success, 0.4 a failure; only (success, failure) pairs count
    three = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([0.6, 0.8, 0.4])
    want = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert v0.ranking_loss(three, y).item() == pytest.approx(want, abs=1e-6)
    assert v0.ranking_loss(three, torch.tensor([1.0, 1.0, 0.5])).item() == 0.0  # no failure: no pair


def test_soft_ce_and_combined_loss():
    logits = torch.tensor([[0.0, 0.0]])
    assert v0.soft_ce(logits, torch.tensor([0.3])).item() == pytest.approx(math.log(2), abs=1e-6)
    # soft labels, where hard CE (target 1[y >= .5]) differs: -(0.7 log p0 + 0.3 log p1) with p1 = sigma(1)
    lp1, lp0 = -math.log1p(math.exp(-1)), -math.log1p(math.e)
    one = torch.tensor([[0.0, 1.0]])
    assert v0.soft_ce(one, torch.tensor([0.3])).item() == pytest.approx(-(0.7 * lp0 + 0.3 * lp1), abs=1e-6)  # hard: -lp0
    assert v0.soft_ce(one, torch.tensor([0.6])).item() == pytest.approx(-(0.4 * lp0 + 0.6 * lp1), abs=1e-6)  # hard: -lp1
    # L = 0.25 * ranking + 0.75 * soft CE, by hand: one pair (s = 1 vs 0), CE of y = (1, 0)
    logits = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    rank, ce = math.log1p(math.exp(-1)), (-lp1 + math.log(2)) / 2
    assert v0.v0_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25 * rank + 0.75 * ce, abs=1e-6)


def test_standardise_is_the_context_z_score_and_handles_small_contexts():
    g = torch.Generator().manual_seed(0)
    zc, zq = torch.randn(20, 5, generator=g) * 0.05 + 1.0, torch.randn(3, 5, generator=g) * 0.05 + 1.0
    xc, xq = v0.standardise(zc, zq)  # a normal context: (z - mean) / (biased std + 1e-4), unclipped
    sd = zc.std(0, unbiased=False) + 1e-4
    assert torch.allclose(xq, (zq - zc.mean(0)) / sd, atol=1e-6) and torch.allclose(xc, (zc - zc.mean(0)) / sd, atol=1e-6)
    # one row: every feature is constant on the context -> centred only (TabPFN: std 1), not divided by 1e-4
    xc, xq = v0.standardise(zc[:1], zq)
    assert torch.equal(xc, torch.zeros_like(xc)) and torch.allclose(xq, zq - zc[0], atol=1e-7)
    # a constant column among varying ones: only that column is left unscaled; extreme values clip at 100
    zc2 = zc.clone()
    zc2[:, 2] = 0.7
    xc, xq = v0.standardise(zc2, zq)
    assert torch.allclose(xq[:, 2], zq[:, 2] - 0.7, atol=1e-6) and torch.allclose(xq[:, 0], ((zq - zc2.mean(0)) / sd)[:, 0], atol=1e-6)
    far = zc.mean(0, keepdim=True) + 1e3
    assert torch.equal(v0.standardise(zc, far)[1], torch.full_like(far, 100.0))


def test_head_is_invariant_to_context_order_and_queries_are_independent():
    torch.manual_seed(0)
    head = v0.InContextHead(f=12, h=16, layers=2, heads=2, dropout=0.0).eval()
    zc, yc, zq = torch.randn(20, 12), torch.rand(20), torch.randn(5, 12)
    out = head(zc, yc, zq)
    assert out.shape == (5, 2)
    perm = torch.randperm(20)
    assert torch.allclose(head(zc[perm], yc[perm], zq), out, atol=1e-5)
    assert torch.allclose(head(zc, yc, zq[2:3]), out[2:3], atol=1e-5)  # a query sees the context, not other queries
    # the labels matter: flipping them changes the prediction
    assert not torch.allclose(head(zc, 1 - yc, zq), out, atol=1e-3)


# ------------------------------------------------------------------------------------------------ data


def test_loader_reads_the_authors_files():
    prompts, rows = v0.load_folder(V0_DATA)
    assert len(prompts) == 2910 and len(rows) == 3072 + 192
    tasks = v0.by_task(rows)
    assert len(tasks) == 6 and all(len(v) == 544 for v in tasks.values())
    r = rows[0]
    assert v0.prompt_key(r) in prompts and v0.success_rate(r["score"]) == (r["score"] + 1) / 2
    assert {x["type"] for x in rows} == {"context", "train_query"}


@pytest.mark.parametrize("line, msg", [
    ('{"id": 1, "score": 0.2, "model": "m", "step": 1}', "lacks ['dataset']"),
    ('{"id": 1, "score": 1.5, "model": "m", "step": 1, "dataset": "d"}', "score must be a number in [-1, 1]"),
    ('{"id": 9, "score": 0.2, "model": "m", "step": 1, "dataset": "d"}', "prompt 'd_9' is not in the prompt file"),
    ('{"id": 1, "score": 0.2,', "not valid JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, msg):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"id": 1, "score": 0.2, "model": "m", "step": 1, "dataset": "d"}\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        v0.read_rows(f, {"d_1": "What is 1 + 1?"})
    assert f"{f}:2" in str(e.value) and msg in str(e.value)


def test_holdout_removes_prompts_from_every_task():
    _, rows = v0.load_folder(V0_DATA)
    keep, held = C.split_by_key(rows, v0.prompt_key, 0.2, seed=0)
    assert len(keep) + len(held) == len(rows)
    assert not {v0.prompt_key(r) for r in keep} & {v0.prompt_key(r) for r in held}
    assert 0.15 < len({v0.prompt_key(r) for r in held}) / len({v0.prompt_key(r) for r in rows}) < 0.25


# ------------------------------------------------------------------------------------------------ metrics


def test_roc_auc_and_knn():
    assert C.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert C.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(C.roc_auc([0.1, 0.2], [1, 1]))
    ec = np.array([[1, 0]] * 10 + [[0, 1]] * 10, float)
    yc = np.array([0.9] * 10 + [0.1] * 10)
    p = v0_eval.knn_baseline(ec, yc, np.array([[1, 0.1], [0.1, 1]]))
    assert p == pytest.approx([0.9, 0.1])


def test_temperature_scaling_recovers_overconfidence():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, generator=g) * 1.5
    y = torch.bernoulli(torch.sigmoid(true), generator=g)
    logits = torch.stack([torch.zeros_like(true), 3 * true], -1)  # 3x overconfident
    assert v0.fit_temperature(logits, y) == pytest.approx(3.0, rel=0.12)


# ------------------------------------------------------------------------------------------------ allocation


def best_allocation(p, budget, n_min, n_max):
    """The exact optimum of allocate_budget's objective, by dynamic programming over (candidate, rollouts used)."""
    sizes = [0, *range(n_min, n_max + 1)]
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    for pi in p:
        best = np.array([max((best[b - n] + v0.informative_prob(pi, n) for n in sizes if n <= b), default=-np.inf)
                         for b in range(budget + 1)])
    return best.max()


def test_allocate_budget_respects_the_budget_and_skips_certain_prompts():
    p = np.array([0.0, 1.0, 0.5, 0.3, 0.02, 0.6])
    n = v0.allocate_budget(p, budget=12, n_min=4, n_max=8)
    assert n.tolist() == [0, 0, 4, 4, 0, 4]  # three groups of 4 (u(.5, 4) / 4 beats every top-up)
    assert v0.allocate_budget(np.full(2, 0.5), budget=40, n_min=4, n_max=8).sum() == 16  # every candidate full
    # rollouts left that cannot open a group stay unspent, though a candidate is still empty
    assert v0.allocate_budget(np.full(3, 0.5), 10, 4, 4).tolist() == [4, 4, 0]
    # a prompt predicted at 0 gets rollouts only when no other group can use them
    assert v0.allocate_budget(np.array([0.0, 0.5, 0.5]), 16, 4, 8).tolist() == [0, 8, 8]
    assert v0.allocate_budget(np.array([0.0, 0.5]), 16, 4, 8).tolist() == [8, 8]
    # the top-up goes to the larger gain u(p, 5) - u(p, 4): 0.2^4 0.8 + 0.8^4 0.2 = 0.083 for p = .2, 0.0625 for .5
    assert v0.allocate_budget(np.array([0.5, 0.2]), 9, 4, 8).tolist() == [4, 5]
    assert v0.allocate_budget(np.array([-0.1, 0.5, 1.2]), 20, 4, 8).tolist() == [8, 8, 4]  # as p = [0, .5, 1]
    # a tie between opening a group and growing one goes to opening: u(.5, 2) / 2 = u(.5, 3) - u(.5, 2) = 1/4
    assert v0.allocate_budget(np.full(2, 0.5), 4, 2, 3).tolist() == [2, 2]
    # n_min == n_max == G: pick the prompts most likely to be informative
    n = v0.allocate_budget(np.array([0.5, 0.05, 0.95, 0.4]), 8, 4, 4)
    assert n.tolist() == [4, 0, 0, 4]


def test_allocate_budget_is_greedy_exact_in_the_cases_its_docstring_names():
    u = lambda p, n: float(v0.informative_prob(p, n).sum())  # noqa: E731
    # not optimal in general: the docstring's example
    n = v0.allocate_budget(np.array([0.55, 0.46]), 4, 2, 3)
    assert n.tolist() == [0, 3] and u([0.55, 0.46], n) == pytest.approx(0.7452, abs=1e-4)
    assert best_allocation([0.55, 0.46], 4, 2, 3) == pytest.approx(u([0.55, 0.46], [2, 2]), abs=1e-9) == pytest.approx(0.9918, abs=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(200):  # n_min == n_max: exact
        p, G = rng.random(int(rng.integers(2, 8))), int(rng.integers(2, 6))
        budget = int(rng.integers(G, G * len(p) + 3))
        assert u(p, v0.allocate_budget(p, budget, G, G)) == pytest.approx(best_allocation(p, budget, G, G), abs=1e-9)
    for _ in range(40):  # the default shape (24 candidates, 32 rollouts, groups of 4-8) with arith-like p
        p = np.clip(rng.choice([0.0, 0.02, 0.3, 0.5, 0.7, 0.98], size=24) + rng.normal(0, 0.15, 24), 0, 1)
        assert u(p, v0.allocate_budget(p, 32, 4, 8)) == pytest.approx(best_allocation(p, 32, 4, 8), abs=1e-9)


def test_informative_prob_matches_simulation():
    rng = np.random.default_rng(0)
    for p, n in [(0.3, 4), (0.5, 2), (0.9, 8)]:
        sim = (rng.binomial(n, p, 200_000) % n != 0).mean()  # neither 0 nor n successes
        assert v0.informative_prob(p, n) == pytest.approx(sim, abs=0.005)
    assert v0.informative_prob(0.5, 0) == 0 and v0.informative_prob(0.5, 1) == 0  # no group, or one rollout


def test_v0_allocation_wastes_fewer_rollouts_than_uniform():
    """Statistical: prompts with arith-like success rates (many near 0 or 1), a predictor with noise
    (sd 0.15 on p), 2000 simulated steps with a fixed seed. Wasted share = rollouts in groups whose rewards are
    all equal. Tolerance: V0's share must be lower by at least 0.1 (measured: ~0.45 -> ~0.2)."""
    rng = np.random.default_rng(0)
    waste = {"uniform": [0, 0], "v0": [0, 0]}
    for _ in range(2000):
        p = np.clip(rng.choice([0.0, 0.02, 0.3, 0.5, 0.7, 0.98], size=24), 0, 1)
        p_hat = np.clip(p + rng.normal(0, 0.15, p.shape), 0, 1)
        for name, n in (("uniform", np.array([4] * 8 + [0] * 16)), ("v0", v0.allocate_budget(p_hat, 32, 4, 8))):
            k = rng.binomial(n, p)
            flat = (n > 0) & ((k == 0) | (k == n))
            waste[name][0] += n[flat].sum()
            waste[name][1] += n.sum()
    share = {k: w / t for k, (w, t) in waste.items()}
    assert share["v0"] < share["uniform"] - 0.1, share


def groups_of(*rewards):
    return [v0_grpo.Group(problem=None, rollouts=[], rewards=torch.tensor(r)) for r in rewards]


def test_advantages_of_groups_of_different_sizes_are_grpos_per_group():
    r = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1]])
    assert torch.equal(v0_grpo.advantages_per_group(groups_of(*r.tolist())), grpo.group_advantages(r).flatten())
    # ragged: a group of 2 and a group of 3
    a = v0_grpo.advantages_per_group(groups_of([1.0, 0], [1.0, 1, 0]), scale_std=False)
    assert a.tolist() == pytest.approx([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3])
    # scaled, ddof 1: group 0 std sqrt(1/2), group 1 std sqrt(1/3); a group of one gets A = 0
    a = v0_grpo.advantages_per_group(groups_of([1.0, 0], [1.0, 1, 0], [1.0]))
    s2, s3 = math.sqrt(0.5) + 1e-6, math.sqrt(1 / 3) + 1e-6
    assert a.tolist() == pytest.approx([0.5 / s2, -0.5 / s2, 1 / 3 / s3, 1 / 3 / s3, -2 / 3 / s3, 0.0], abs=1e-6)


def test_route_choice_and_curve():
    p = np.array([[0.5, 0.2, 0.9], [0.6, 0.8, 0.95]])  # policy 1 is better everywhere, and costs more
    costs = np.array([1.0, 3.0])
    assert v0_route.route_choice(p, costs, 0.0).tolist() == [1, 1, 1]
    assert v0_route.route_choice(p, costs, 0.1).tolist() == [0, 1, 0]  # pay 2 cost units only for a gain > 0.2
    assert v0_route.route_choice(p, costs, 10.0).tolist() == [0, 0, 0]
    # a difference, not a ratio: p / cost would pick policy 0 here (0.3 > 0.25); 0.5 - 0.2 > 0.3 - 0.1
    assert v0_route.route_choice(np.array([[0.3], [0.5]]), np.array([1.0, 2.0]), 0.1).tolist() == [1]
    truth = np.array([[0.0, 0.5, 1.0], [1.0, 1.0, 0.5]])
    got = v0_route.route_curve(p, truth, costs, [0.0, 0.1, 10.0])  # (lambda, mean cost, mean true success)
    assert np.array(got) == pytest.approx(np.array([(0.0, 3.0, 2.5 / 3), (0.1, 5 / 3, 2 / 3), (10.0, 1.0, 1.5 / 3)]))


def test_knn_picks_k_by_leave_one_out():
    # 12 points on a circle (no two equally far from any point), query at angle 1. Leave-one-out (a point is
    # never its own neighbour) picks k = 5 for the first labels, k = 10 for the second (counting the point
    # itself would pick 5 there too)
    ang = np.random.default_rng(2).uniform(0, 2 * np.pi, 12)
    ec, eq = np.stack([np.cos(ang), np.sin(ang)], 1), np.array([[math.cos(1.0), math.sin(1.0)]])
    sim = ec @ ec.T
    np.fill_diagonal(sim, -np.inf)
    for y, k in (([1, 3, 4, 2, 2, 5, 4, 5, 2, 4, 5, 3], 5), ([0, 2, 1, 4, 4, 4, 5, 5, 1, 0, 0, 4], 10)):
        yc = np.array(y) / 5
        loo = {j: np.mean((yc[np.argsort(-sim, 1)[:, :j]].mean(1) - yc) ** 2) for j in (5, 10)}
        want = yc[np.argsort(-(ec @ eq[0]))[:k]].mean()
        assert min(loo, key=loo.get) == k and v0_eval.knn_baseline(ec, yc, eq) == pytest.approx([want])
    assert v0_eval.context_mean_baseline(yc, 2).tolist() == pytest.approx([30 / 60] * 2)  # the mean (the median is 0.6)


def test_episodes_split_each_task_into_queries_and_a_disjoint_context():
    class A:
        queries, min_context, max_context = 16, 8, 20
    tasks = {"a": np.arange(50), "b": np.arange(50, 80)}
    rng = np.random.default_rng(0)
    eps = v0.episodes(tasks, A, rng)
    sizes = {len(c) for _ in range(30) for _, c, _ in v0.episodes(tasks, A, rng)}
    assert sizes == set(range(8, 21))  # the context size is drawn from [min_context, max_context], ends included
    for key, idx in tasks.items():
        mine = [(c, q) for k, c, q in eps if k == key]
        assert sorted(np.concatenate([q for _, q in mine]).tolist()) == idx.tolist()  # every row a query once
        for c, q in mine:
            assert not set(c) & set(q) and set(c) <= set(idx) and 8 <= len(c) <= 20 and len(set(c)) == len(c)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def small_folder(module_dir):
    """Two of the authors' tasks, 60 rows each: enough for a 1-epoch train and an eval."""
    d = module_dir("v0small")
    prompts, rows = v0.load_folder(V0_DATA)
    tasks = list(v0.by_task(rows).values())[:2]
    keep = [r for t in tasks for r in t[:60]]
    (d / "prompt_dict.json").write_text(json.dumps({v0.prompt_key(r): prompts[v0.prompt_key(r)] for r in keep}))
    (d / "context.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return d


SMALL_MODEL = ["--K", "8", "--e", "6", "--head-dim", "16", "--head-layers", "1", "--queries", "16",
               "--min-context", "8", "--max-context", "32"]


@pytest.mark.slow
def test_train_then_eval_prints_the_summary_line(small_folder, tmp_path):
    out = tmp_path / "ckpt"
    run("benchmarks/v0_eval.py", "train", "--data", str(small_folder), "--out", str(out), "--epochs", "2",
        "--holdout", "0.25", *SMALL_MODEL)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["K"] == 8 and cfg["temperature"] > 0
    kept, _ = C.split_by_key(v0.load_folder(small_folder)[1], v0.prompt_key, 0.25, seed=0)
    # trained on the kept rows only, less the --val share
    assert cfg["rows"] == len(C.split_by_key(kept, v0.prompt_key, 0.1, seed=1)[0]) < len(kept)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    p = run("benchmarks/v0_eval.py", "--ckpt", str(out), "--prompts", str(small_folder / "prompt_dict.json"),
            "--context", str(out / "heldout" / "context.jsonl"), "--queries", str(out / "heldout" / "queries.jsonl"))
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("overall auc=")
    vals = {k: float(v) for k, v in (kv.split("=") for kv in last.split()[1:])}
    assert set(vals) == {"auc", "mse", "baseline_mean_mse", "baseline_knn_auc"}
    # the printed numbers, recomputed here: per task, the context is the kept rows minus the query prompts
    prompts = v0.read_prompts(small_folder / "prompt_dict.json")
    ctx, qs = (v0.by_task(v0.read_rows(out / "heldout" / f, prompts)) for f in ("context.jsonl", "queries.jsonl"))
    model, backbone = v0.load_v0(out)
    se, se_mean, aucs = [], [], []
    for key, q in qs.items():
        c = [r for r in ctx[key] if r["id"] not in {x["id"] for x in q}]
        yc, yq = (np.array([v0.success_rate(r["score"]) for r in rs]) for rs in (c, q))
        p = v0.predict(model, backbone, [prompts[v0.prompt_key(r)] for r in c], yc, [prompts[v0.prompt_key(r)] for r in q])
        se += list((p - yq) ** 2)
        se_mean += list((yc.mean() - yq) ** 2)
        aucs.append(C.roc_auc(p, yq >= 0.5))
    assert vals["mse"] == pytest.approx(np.mean(se), abs=1e-4)
    assert vals["baseline_mean_mse"] == pytest.approx(np.mean(se_mean), abs=1e-4)
    assert vals["auc"] == pytest.approx(np.nanmean(aucs), abs=1e-4)


@pytest.mark.slow
def test_train_is_deterministic(small_folder, tmp_path):
    from safetensors.torch import load_file
    for k, first in (("a", []), ("b", ["train"])):  # `v0.py train ...` (the old subcommand) trains the same
        run("v0.py", *first, "--data", str(small_folder), "--out", str(tmp_path / k), "--epochs", "1", *SMALL_MODEL)
    wa, wb = load_file(tmp_path / "a" / "v0.safetensors"), load_file(tmp_path / "b" / "v0.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_initial_history_is_the_last_rows_of_the_checkpoints_context(tmp_path):
    prompts = v0.read_prompts(ROOT / v0.PRETRAINED / "prompt_dict.json")
    rows = v0.read_rows(ROOT / v0.PRETRAINED / "context.jsonl", prompts)
    want = [(prompts[v0.prompt_key(r)], v0.success_rate(r["score"])) for r in rows[-5:]]
    assert v0.initial_history(v0.PRETRAINED, "auto", 5) == want and v0.initial_history(v0.PRETRAINED, "none") == []
    with pytest.raises(SystemExit, match="--history-init"):
        v0.initial_history(v0.PRETRAINED, str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("cls, kw, flag", [
    (v0_grpo.GrpoArgs, {"min_group": 1}, "--min-group"), (v0_grpo.GrpoArgs, {"max_group": 3}, "--max-group"),
    (v0_grpo.GrpoArgs, {"alloc": "uniform", "group_size": 1}, "--group-size"),
    (v0_grpo.GrpoArgs, {"history": 0}, "--history"),
    (v0_grpo.GrpoArgs, {"prompts_per_step": 1, "group_size": 2}, "--min-group"),
    (v0.TrainV0Args, {"e": 7}, "--e"), (v0.TrainV0Args, {"min_context": 300}, "--max-context"),
    (v0.TrainV0Args, {"val": 1.0}, "--val"), (v0_eval.HoldoutTrainArgs, {"holdout": 0.0}, "--holdout"),
    (v0_eval.HoldoutTrainArgs, {"e": 7}, "--e"),  # v0.py's own checks run too
])
def test_flags_that_make_no_sense_are_rejected(cls, kw, flag):
    with pytest.raises(ValueError, match=flag):
        cls(**kw)
    cls()  # the defaults pass


@pytest.mark.slow
@pytest.mark.parametrize("script", ["v0.py", "benchmarks/v0_collect.py", "benchmarks/v0_eval.py", "benchmarks/v0_grpo.py",
                                    "benchmarks/v0_route.py"])
def test_every_v0_program_prints_its_help(script):
    assert "usage:" in run(script, "--help").stdout  # argparse formats every help string (a bare % would fail)


@pytest.mark.slow
def test_the_holdout_training_command_has_its_own_flags():
    assert "--holdout" in run("benchmarks/v0_eval.py", "train", "--help").stdout
    p = run("benchmarks/v0_eval.py", "--holdout", "0.2", check=False)  # evaluation has no such flag
    assert p.returncode != 0 and "--holdout" in p.stderr


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    p = run("benchmarks/v0_eval.py", "--ckpt", str(tmp_path / "nope"), check=False)
    assert p.returncode != 0 and "not a V0 checkpoint" in p.stderr


@pytest.mark.parametrize("folder", [v0.PRETRAINED, v05.V0_DEFAULT])  # v0.py's, v05.py's
def test_pretrained_v0_ships_with_its_context(folder):
    ck = ROOT / folder
    assert (ck / "v0.safetensors").stat().st_size < 8 * 2**20  # "a few MB at most"
    config = json.loads((ck / "config.json").read_text())  # the data it was trained on is committed beside it
    assert len(v0.read_rows(ROOT / config["trained_on"] / "context.jsonl")) > config["rows"]  # rows + --val share
    model, backbone = v0.load_v0(ck)
    prompts = v0.read_prompts(ck / "prompt_dict.json")
    rows = v0.read_rows(ck / "context.jsonl", prompts)
    p = v0.predict(model, backbone, [prompts[v0.prompt_key(r)] for r in rows], [v0.success_rate(r["score"]) for r in rows],
                   ["What is 2 + 1?", "What is 47 times 8 minus 5?"])
    assert p[0] > p[1]  # single-digit addition is easier for smollm2 than level-10 arithmetic


def test_pretrained_v0_reads_a_one_row_context_and_divides_by_its_temperature():
    """A one-row history: the prediction follows its label (features constant on the context are not divided
    by ~1e-4, which drowned the label); predict = softmax(logits / temperature)."""
    model, backbone = v0.load_v0(v0.PRETRAINED)
    ctx, qs = ["What is 3 + 4?"], ["What is 2 + 1?", "What is 47 times 8 minus 5?", "What is 12 minus 9?"]
    p1, p0 = (v0.predict(model, backbone, ctx, [y], qs) for y in (1.0, 0.0))
    assert (p1 > 0.8).all() and (p0 < 0.2).all(), (p1, p0)
    states = backbone.encode(ctx + qs)
    with torch.no_grad():
        z = model.features(states, backbone.pooled(states))
        logits = model(z[:1], torch.tensor([1.0]), z[1:])
    assert backbone.pool == "mean" and torch.equal(backbone.pooled(states[:1])[0], states[0].float().mean(0))  # MiniLM's pooling
    T = model.cfg["temperature"]
    assert T != 1 and p1 == pytest.approx((logits / T).softmax(-1)[:, 1].numpy(), abs=1e-6)


@pytest.mark.slow
def test_collect_writes_rows_in_the_authors_format(tmp_path):
    out = tmp_path / "d" / "context.jsonl"
    run("benchmarks/v0_collect.py", "--problems", "3", "--n", "2", "--max-new-tokens", "8", "--sampler", "hf",
        "--out", str(out))
    prompts = v0.read_prompts(out.parent / "prompt_dict.json")
    rows = v0.read_rows(out, prompts)
    assert len(rows) == 3 and {r["model"] for r in rows} == {"smollm2-135m@T0.7"}
    assert all(r["score"] in (-1.0, 0.0, 1.0) for r in rows)  # mean of two +-1 rewards
    assert prompts["arith_0"] == v0.C.arith_problems("train", 1)[0].question


@pytest.mark.slow
def test_v0_grpo_logs_allocation_metrics(tmp_path):
    out = tmp_path / "run"
    run("benchmarks/v0_grpo.py", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--candidates", "2",
        "--max-new-tokens", "8", "--eval-problems", "0", "--oracle-k", "2", "--out", str(out), "--sampler", "hf")
    row = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["rollouts"] == 8 and "v0_pred_mse" in row
    assert 0 <= row["baseline_mse"] <= 1 and 0 <= row["oracle_var"] <= 0.25  # K = 2: p_hat(1 - p_hat) / 1
    # budget 8, groups of 4-8: one group of 8 or two of 4, so the wasted share equals the share of flat groups
    assert row["groups"] in (1, 2) and row["wasted_rollout_frac"] == pytest.approx(row["frac_reward_zero_std"])
    assert (out / "ckpt" / "state.pt").exists()


@pytest.mark.slow
def test_route_from_rows_writes_a_plot(tmp_path):
    rng = np.random.default_rng(0)
    prompts = {f"arith_{i}": q.question for i, q in enumerate(v0.C.arith_problems("train", 40))}
    rows = []
    for model, skill in (("small", 0.2), ("large", 0.6)):
        for i in range(40):
            rows.append({"id": i, "score": float(np.clip(skill + rng.normal(0, 0.4), -1, 1)), "type": "context",
                         "model": model, "step": 0, "dataset": "arith"})
    (tmp_path / "prompt_dict.json").write_text(json.dumps(prompts))
    (tmp_path / "context.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("benchmarks/v0_route.py", "--rows", str(tmp_path), "--costs", "small=1,large=4",
        "--out", str(tmp_path / "route"))
    res = json.loads((tmp_path / "route" / "route.json").read_text())
    assert (tmp_path / "route" / "route.png").stat().st_size > 1000
    assert res["costs"] == [1.0, 4.0] and len(res["curve"]) > 10
    # the largest lambda routes every problem to the cheap policy: its cost and its measured accuracy
    assert res["curve"][-1][1] == 1.0 and res["curve"][-1][2] == pytest.approx(res["accuracy"][0])
    # the oracle at lambda 0 takes each routed problem's better policy (routed: half the prompts, seed 0)
    keys = sorted(np.random.default_rng(0).choice(sorted(prompts), 20, replace=False).tolist())
    y = {(r["model"], f"arith_{r['id']}"): v0.success_rate(r["score"]) for r in rows}
    truth = np.array([[y[m, k] for k in keys] for m in ("small", "large")])
    assert res["accuracy"] == pytest.approx(truth.mean(1).tolist())
    assert res["oracle"][0][1:] == pytest.approx([np.array([1.0, 4.0])[truth.argmax(0)].mean(), truth.max(0).mean()])
