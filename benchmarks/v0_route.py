"""Route each problem to one of several policies by V0's predicted success rate for its cost; plot accuracy vs cost.

    python benchmarks/v0_route.py --policies smollm2-135m@1.0:1,runs/grpo/ckpt/policy:2   # sample both policies
    python benchmarks/v0_route.py --rows FOLDER --costs small=1,large=4          # or read measured rows

Each policy m gets its own V0 context: its measured success rates on --context-problems (or, with --rows, half of
the prompts its task shares with the others). V0 then predicts p_m(x) for every routed problem, and
route_choice sends x to argmax_m p_m(x) - lambda * cost_m. Sweeping lambda gives an accuracy-cost curve, drawn
beside routing by the true success rates (the ceiling), random routing between the cheapest policy and the
one whose history is best, and each policy alone. Writes OUT/route.png and OUT/route.json.

Choices that are ours (the authors' code has no routing rule): the rule in route_choice, a difference
p - lambda * cost rather than a ratio.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import v0 as V0  # noqa: E402
from common import arg  # noqa: E402
from v0_collect import CollectArgs, collect_rows  # noqa: E402


def route_choice(p: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """Ours (the authors' code has no routing rule): m*(x) = argmax_m p_m(x) - lambda * cost_m.
    p [M, X], costs [M] -> chosen policy per prompt [X]. lambda = 0: the most likely to succeed."""
    return np.argmax(p - lam * costs[:, None], axis=0)


def route_curve(p, truth, costs, lambdas) -> list[tuple[float, float, float]]:
    """(lambda, mean cost, mean true success) for each lambda; truth [M, X] = measured success rates."""
    X = np.arange(p.shape[1])
    out = []
    for lam in lambdas:
        m = route_choice(p, costs, lam)
        out.append((float(lam), float(costs[m].mean()), float(truth[m, X].mean())))
    return out


@dataclass
class RouteArgs:
    """Route each problem to one of several policies by V0's p_m(x) - lambda * cost_m; plot accuracy vs cost."""
    policies: str = arg("smollm2-135m@1.0:1,smollm2-135m@0.3:2", "policies as NAME[@T][:cost], comma-separated "
                        "(NAME: model, HF folder or run folder; T: temperature, default 0.7; cost: default its position)")
    data: str = arg("arith:test", "problems to route")
    problems: int = arg(128, "how many problems to route")
    context_data: str = arg("arith", "problems whose measured success rates form each policy's V0 context")
    context_problems: int = arg(128, "how many")
    n: int = arg(4, "rollouts per problem to measure success rates (context and truth)")
    max_new_tokens: int = arg(48, "response length limit")
    rows: str = arg("", "instead of sampling: a folder in the authors' layout whose tasks are the policies "
                    "(rows sharing prompt ids); half the shared prompts become context, half are routed")
    costs: str = arg("", "with --rows: cost per task as MODEL=cost,... (default: position)")
    v0: str = arg(V0.PRETRAINED, "V0 checkpoint")
    out: str = arg("runs/route", "run folder: route.png, route.json")
    sampler: str = arg("auto", "rollout backend", choices=["auto", "hf", "vllm"])
    device: str = arg("auto", "cpu, cuda, or auto")
    seed: int = arg(0, "seed")


def route_inputs_from_policies(args: RouteArgs):
    specs = []
    for k, item in enumerate(args.policies.split(",")):
        name, _, cost = item.strip().partition(":")
        name, _, t = name.partition("@")
        specs.append((name, float(t or 0.7), float(cost or k + 1)))
    ctx_p, test_p = C.load_problems(args.context_data, args.context_problems), C.load_problems(args.data, args.problems)
    cargs = CollectArgs(n=args.n, max_new_tokens=args.max_new_tokens, sampler=args.sampler, seed=args.seed,
                        device=args.device)
    names, costs, ctx, truth = [], [], [], []
    for name, t, cost in specs:
        c_rows = collect_rows(name, t, ctx_p, list(range(len(ctx_p))), "ctx", cargs, label=f"{name}@T{t:g}")
        t_rows = collect_rows(name, t, test_p, list(range(len(test_p))), "test", cargs, label=f"{name}@T{t:g}")
        names.append(f"{name}@T{t:g}")
        costs.append(cost)
        ctx.append(([p.question for p in ctx_p], [V0.success_rate(r["score"]) for r in c_rows]))
        truth.append([V0.success_rate(r["score"]) for r in t_rows])
    return names, np.array(costs), ctx, [p.question for p in test_p], np.array(truth)


def route_inputs_from_rows(args: RouteArgs):
    prompts, rows = V0.load_folder(args.rows)
    tasks = V0.by_task(rows)
    names = [f"{model}/{step}" for _, model, step in tasks]  # a task is (dataset, model, step)
    shared = sorted(set.intersection(*[{V0.prompt_key(r) for r in v} for v in tasks.values()]))
    if len(shared) < 4:
        raise SystemExit(f"--rows {args.rows}: the tasks share {len(shared)} prompts; routing needs the same prompts "
                         "measured under every policy")
    test = set(C.split_by_key(shared, str, 0.5, args.seed)[1])
    given = dict(kv.split("=") for kv in args.costs.split(",")) if args.costs else {}
    costs = np.array([float(given.get(model, i + 1)) for i, (_, model, _) in enumerate(tasks)])
    ctx, truth = [], []
    test_keys = sorted(test)
    for v in tasks.values():
        c = [r for r in v if V0.prompt_key(r) not in test]
        ctx.append(([prompts[V0.prompt_key(r)] for r in c], [V0.success_rate(r["score"]) for r in c]))
        y = {V0.prompt_key(r): V0.success_rate(r["score"]) for r in v}
        truth.append([y[k] for k in test_keys])
    return names, costs, ctx, [prompts[k] for k in test_keys], np.array(truth)


def main(args: RouteArgs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    C.seed_everything(args.seed)
    names, costs, ctx, queries, truth = (route_inputs_from_rows if args.rows else route_inputs_from_policies)(args)
    model, backbone = V0.load_v0(args.v0)
    p = np.stack([V0.predict(model, backbone, texts, rates, queries) for texts, rates in ctx])  # [M, X]
    X = np.arange(truth.shape[1])
    lambdas = np.concatenate([[0.0], np.geomspace(1e-3, 10, 60) / max(np.ptp(costs), 1e-9)])
    curve = route_curve(p, truth, costs, lambdas)
    oracle = route_curve(truth, truth, costs, lambdas)  # routing by the true success rates: the ceiling
    cheap = int(np.argmin(costs))
    best = int(np.argmax([np.mean(rates) for _, rates in ctx]))  # best by its history
    rand = [(q * costs[best] + (1 - q) * costs[cheap], q * truth[best].mean() + (1 - q) * truth[cheap].mean())
            for q in np.linspace(0, 1, 11)]  # pick `best` with probability q (expected values)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([cost for _, cost, _ in curve], [acc for _, _, acc in curve], "o-", ms=3,
            label="V0 routing: argmax p - lambda*cost")
    ax.plot([cost for _, cost, _ in oracle], [acc for _, _, acc in oracle], ":", color="gray",
            label="oracle routing (true p)")
    ax.plot([cost for cost, _ in rand], [acc for _, acc in rand], "--", color="tab:red", label="random routing")
    for m, mk in ((cheap, "s"), (best, "^")):
        ax.plot(costs[m], truth[m].mean(), mk, ms=9, label=f"always {names[m]}")
    ax.set_xlabel("mean cost per problem")
    ax.set_ylabel("accuracy (measured success rate)")
    ax.set_title(f"routing {len(X)} problems among {len(names)} policies")
    ax.legend(fontsize=7)
    ax.grid(alpha=.3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "route.png", dpi=120)
    res = {"policies": names, "costs": costs.tolist(), "accuracy": truth.mean(1).tolist(),
           "v0_auc": [C.roc_auc(p[m], truth[m] >= 0.5) for m in range(len(names))],
           "curve": curve, "oracle": oracle, "random": rand}
    (out / "route.json").write_text(json.dumps(res, indent=1))
    for m, nm in enumerate(names):
        print(f"always {nm:<28} cost={costs[m]:.3g} acc={truth[m].mean():.3f} (V0 AUC on it {res['v0_auc'][m]:.3f})")
    for lam, c, a in curve[::10]:
        print(f"lambda={lam:<9.4g} cost={c:.3f} acc={a:.3f}")
    print(f"wrote {out / 'route.png'} and {out / 'route.json'}")
    return res


if __name__ == "__main__":
    main(C.parse_args(RouteArgs))
