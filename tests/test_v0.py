"""v0.py: the adapter, the loss, the in-context head, the loaders, budget allocation, routing, and every
subcommand run end to end on a tiny budget."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import grpo
import v0
import v05
from conftest import ROOT, SHARED

V0_DATA = SHARED / "data" / "v0"


def run(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "v0.py"), *args], capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-2000:] + p.stderr[-3000:])
    return p


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
    logits = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([1.0, 0.0])
    want = 0.25 * v0.ranking_loss(logits, y) + 0.75 * v0.soft_ce(logits, y)
    assert v0.v0_loss(logits, y).item() == pytest.approx(want.item(), abs=1e-7)


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
    keep, held = v0.split_holdout(rows, 0.2, seed=0)
    assert len(keep) + len(held) == len(rows)
    assert not {v0.prompt_key(r) for r in keep} & {v0.prompt_key(r) for r in held}
    assert 0.15 < len({v0.prompt_key(r) for r in held}) / len({v0.prompt_key(r) for r in rows}) < 0.25


# ------------------------------------------------------------------------------------------------ metrics


def test_roc_auc_and_knn():
    assert v0.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert v0.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(v0.roc_auc([0.1, 0.2], [1, 1]))
    ec = np.array([[1, 0]] * 10 + [[0, 1]] * 10, float)
    yc = np.array([0.9] * 10 + [0.1] * 10)
    p = v0.knn_baseline(ec, yc, np.array([[1, 0.1], [0.1, 1]]))
    assert p == pytest.approx([0.9, 0.1])


def test_temperature_scaling_recovers_overconfidence():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, generator=g) * 1.5
    y = torch.bernoulli(torch.sigmoid(true), generator=g)
    logits = torch.stack([torch.zeros_like(true), 3 * true], -1)  # 3x overconfident
    assert v0.fit_temperature(logits, y) == pytest.approx(3.0, rel=0.12)


# ------------------------------------------------------------------------------------------------ allocation


def test_allocate_budget_respects_the_budget_and_skips_certain_prompts():
    p = np.array([0.0, 1.0, 0.5, 0.3, 0.02, 0.6])
    n = v0.allocate_budget(p, budget=12, n_min=4, n_max=8)
    assert n.sum() == 12 and set(n[n > 0]) <= set(range(4, 9))
    assert n[0] == 0 and n[1] == 0 and n[4] == 0  # p = 0 or 1 (or nearly): no group is informative
    assert n[2] > 0
    assert v0.allocate_budget(np.full(2, 0.5), budget=40, n_min=4, n_max=8).sum() == 16  # every candidate full
    # n_min == n_max == G: pick the prompts most likely to be informative
    n = v0.allocate_budget(np.array([0.5, 0.05, 0.95, 0.4]), 8, 4, 4)
    assert n.tolist() == [4, 0, 0, 4]


def test_informative_prob_matches_simulation():
    rng = np.random.default_rng(0)
    for p, n in [(0.3, 4), (0.5, 2), (0.9, 8)]:
        sim = (rng.binomial(n, p, 200_000) % n != 0).mean()  # neither 0 nor n successes
        assert v0.informative_prob(p, n) == pytest.approx(sim, abs=0.005)


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


def test_ragged_group_advantages_match_grpo_on_equal_groups():
    r = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1]])
    g = torch.arange(2).repeat_interleave(4)
    assert torch.allclose(v0.ragged_group_advantages(r.flatten(), g), grpo.group_advantages(r).flatten(), atol=1e-6)
    # ragged: a group of 2 and a group of 3
    a = v0.ragged_group_advantages(torch.tensor([1.0, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1]), scale_std=False)
    assert a.tolist() == pytest.approx([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3])


def test_route_choice():
    p = np.array([[0.5, 0.2, 0.9], [0.6, 0.8, 0.95]])  # policy 1 is better everywhere, and costs more
    costs = np.array([1.0, 3.0])
    assert v0.route_choice(p, costs, 0.0).tolist() == [1, 1, 1]
    assert v0.route_choice(p, costs, 0.1).tolist() == [0, 1, 0]  # pay 2 cost units only for a gain > 0.2
    assert v0.route_choice(p, costs, 10.0).tolist() == [0, 0, 0]


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


def test_train_then_eval_prints_the_summary_line(small_folder, tmp_path):
    out = tmp_path / "ckpt"
    run("train", "--data", str(small_folder), "--out", str(out), "--epochs", "2", "--holdout", "0.25", *SMALL_MODEL)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["K"] == 8 and cfg["temperature"] > 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    p = run("eval", "--ckpt", str(out), "--prompts", str(small_folder / "prompt_dict.json"),
            "--context", str(out / "heldout" / "context.jsonl"), "--queries", str(out / "heldout" / "queries.jsonl"))
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("overall auc=")
    vals = dict(kv.split("=") for kv in last.split()[1:])
    assert set(vals) == {"auc", "mse", "baseline_mean_mse", "baseline_knn_auc"}
    assert all(0 <= float(v) <= 1 for v in vals.values())


def test_train_is_deterministic(small_folder, tmp_path):
    from safetensors.torch import load_file
    for k in ("a", "b"):
        run("train", "--data", str(small_folder), "--out", str(tmp_path / k), "--epochs", "1", *SMALL_MODEL)
    wa, wb = load_file(tmp_path / "a" / "v0.safetensors"), load_file(tmp_path / "b" / "v0.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    p = run("eval", "--ckpt", str(tmp_path / "nope"), check=False)
    assert p.returncode != 0 and "not a V0 checkpoint" in p.stderr


@pytest.mark.parametrize("folder", [v0.PRETRAINED, v05.V0_DEFAULT])  # v0.py's, v05.py's
def test_pretrained_v0_ships_with_its_context(folder):
    ck = ROOT / folder
    assert (ck / "v0.safetensors").stat().st_size < 8 * 2**20  # "a few MB at most"
    config = json.loads((ck / "config.json").read_text())  # the data it was trained on is committed beside it
    assert len(v0.read_rows(ROOT / config["trained_on"] / "context.jsonl")) > config["rows"]  # rows + --val share
    model, bb = v0.load_v0(ck)
    prompts = v0.read_prompts(ck / "prompt_dict.json")
    rows = v0.read_rows(ck / "context.jsonl", prompts)
    p = v0.predict(model, bb, [prompts[v0.prompt_key(r)] for r in rows], [v0.success_rate(r["score"]) for r in rows],
                   ["What is 2 + 1?", "What is 47 times 8 minus 5?"])
    assert p[0] > p[1]  # single-digit addition is easier for smollm2 than level-10 arithmetic


def test_collect_writes_rows_in_the_authors_format(tmp_path):
    out = tmp_path / "d" / "context.jsonl"
    run("collect", "--problems", "3", "--n", "2", "--max-new-tokens", "8", "--sampler", "hf", "--out", str(out))
    prompts = v0.read_prompts(out.parent / "prompt_dict.json")
    rows = v0.read_rows(out, prompts)
    assert len(rows) == 3 and {r["model"] for r in rows} == {"smollm2-135m@T0.7"}
    assert all(r["score"] in (-1.0, 0.0, 1.0) for r in rows)  # mean of two +-1 rewards
    assert prompts["arith_0"] == v0.C.arith_problems("train", 1)[0].question


def test_grpo_subcommand_logs_allocation_metrics(tmp_path):
    out = tmp_path / "run"
    run("grpo", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--candidates", "2",
        "--max-new-tokens", "8", "--eval-problems", "0", "--out", str(out), "--sampler", "hf")
    row = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["rollouts"] == 8 and row["wasted_rollout_frac"] is not None and "v0_pred_mse" in row
    assert (out / "ckpt" / "state.pt").exists()


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
    run("route", "--rows", str(tmp_path), "--costs", "small=1,large=4", "--out", str(tmp_path / "route"))
    res = json.loads((tmp_path / "route" / "route.json").read_text())
    assert (tmp_path / "route" / "route.png").stat().st_size > 1000
    assert res["costs"] == [1.0, 4.0] and len(res["curve"]) > 10
    costs = [c[1] for c in res["curve"]]
    assert costs[0] >= costs[-1]  # a larger lambda never buys more cost
