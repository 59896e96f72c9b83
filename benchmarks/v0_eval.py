"""V0 against two baselines on query rows it was not trained on: within-task ROC-AUC (label: success rate >= 0.5)
and MSE of V0's p(x), of the context's mean success rate, and of k nearest neighbours in the backbone's embedding.

    python benchmarks/v0_eval.py train --holdout 0.2 --out runs/v0   # v0.py's training, 20% of prompt ids held out
    python benchmarks/v0_eval.py --ckpt runs/v0                        # reads runs/v0/heldout/{context,queries}.jsonl

Each task (dataset, model, step) is predicted from its own context rows; a query never sees its own label.

Choices that are ours, not the authors'
  - AUC: the mean of within-task AUCs (the authors log gAUC, per-step AUCs weighted by query count, and one AUC
    over all queries); MSE over all queries.
  - kNN baseline: cosine similarity on the pooled backbone embedding, k chosen by leave-one-out MSE on the
    context from {5, 10, 20, 40}.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import v0 as V0  # noqa: E402
from common import arg  # noqa: E402


def context_mean_baseline(yc: np.ndarray, n_queries: int) -> np.ndarray:
    return np.full(n_queries, float(np.mean(yc)))


def knn_baseline(ec: np.ndarray, yc: np.ndarray, eq: np.ndarray, ks=(5, 10, 20, 40)) -> np.ndarray:
    """k-nearest neighbours by cosine similarity on the pooled embedding; k by leave-one-out MSE on the context.
    ec [Nc, d], yc [Nc], eq [Nq, d] -> [Nq]"""
    norm = lambda e: e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-9)  # noqa: E731
    ec, eq = norm(ec), norm(eq)
    sim_cc = ec @ ec.T
    np.fill_diagonal(sim_cc, -np.inf)
    ks = [k for k in ks if k < len(yc)] or [max(1, len(yc) - 1)]
    loo = {k: np.mean((yc[np.argsort(-sim_cc, 1)[:, :k]].mean(1) - yc) ** 2) for k in ks}
    k = min(loo, key=loo.get)
    return yc[np.argsort(-(eq @ ec.T), 1)[:, :k]].mean(1)


@dataclass
class EvalArgs:
    """Within-task ROC-AUC (label: success rate >= 0.5) and MSE of V0 vs the context mean and kNN."""
    ckpt: str = arg("runs/v0", "V0 checkpoint folder (what `python v0.py` writes by default)")
    prompts: str = arg("../shared/data/v0/prompt_dict.json", "prompt file {'<dataset>_<id>': text}")
    context: str = arg("", "context rows, the policies' histories (default: CKPT/heldout/context.jsonl, "
                       "else ../shared/data/v0/context.jsonl)")
    queries: str = arg("", "query rows V0 was not trained on (default: CKPT/heldout/queries.jsonl, written by "
                       "`python benchmarks/v0_eval.py train --holdout`)")
    max_context: int = arg(0, "use at most this many context rows per task (0: all)")
    seed: int = arg(0, "seed (subsampling of the context)")


@dataclass
class HoldoutTrainArgs(V0.TrainV0Args):
    """Train V0 as v0.py does, on all but a share of the prompt ids (with all their rows, in every task)."""
    holdout: float = arg(0.2, "share of prompt ids never trained on, written to OUT/heldout/{context,queries}.jsonl")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout must be in (0, 1), got {self.holdout}")


def train_with_holdout(args: HoldoutTrainArgs) -> Path:
    """Hold out prompt ids, write their rows as the queries and the kept rows as the context (only the rows typed
    'context' where the file types them, as the authors' context.jsonl does), then train V0 on the kept rows."""
    prompts, rows = V0.load_folder(args.data)
    rows, held = C.split_by_key(rows, V0.prompt_key, args.holdout, args.seed)
    held_q = [r for r in held if r.get("type") == "context"] or held
    out = Path(args.out) / "heldout"
    C.write_jsonl(out / "queries.jsonl", held_q)
    C.write_jsonl(out / "context.jsonl", [r for r in rows if r.get("type") == "context"] or rows)
    print(f"held out {len({V0.prompt_key(r) for r in held})} prompts ({len(held_q)} query rows) -> {out}")
    V0.fit(args, prompts, rows)
    print(f"evaluate with: python benchmarks/v0_eval.py --ckpt {args.out} --prompts "
          f"{Path(args.data) / 'prompt_dict.json'}")
    return Path(args.out)


def evaluate_v0(model, backbone, prompts, ctx_rows, q_rows, max_context=0, seed=0, out=print) -> dict:
    ctx_by, q_by = V0.by_task(ctx_rows), V0.by_task(q_rows)
    res, all_y, all_p, all_m, all_k = [], [], [], [], []
    rng = np.random.default_rng(seed)
    for key in sorted(q_by, key=str):
        q = q_by[key]
        qids = {r["id"] for r in q}
        ctx = [r for r in ctx_by.get(key, []) if r["id"] not in qids]  # a query never sees its own label
        if len(ctx) < 2:
            out(f"skip task {key}: {len(ctx)} context rows")
            continue
        if max_context and len(ctx) > max_context:
            ctx = [ctx[i] for i in rng.choice(len(ctx), max_context, replace=False)]
        ct, qt = [prompts[V0.prompt_key(r)] for r in ctx], [prompts[V0.prompt_key(r)] for r in q]
        yc = np.array([V0.success_rate(r["score"]) for r in ctx])
        yq = np.array([V0.success_rate(r["score"]) for r in q])
        p = V0.predict(model, backbone, ct, yc, qt)
        emb = backbone.pooled(backbone.encode(ct + qt)).numpy()
        p_mean, p_knn = context_mean_baseline(yc, len(q)), knn_baseline(emb[:len(ct)], yc, emb[len(ct):])
        lab = yq >= 0.5
        r = {"task": "/".join(map(str, key)), "n_ctx": len(ctx), "n_query": len(q), "auc": C.roc_auc(p, lab),
             "mse": float(np.mean((p - yq) ** 2)), "mean_mse": float(np.mean((p_mean - yq) ** 2)),
             "knn_auc": C.roc_auc(p_knn, lab), "knn_mse": float(np.mean((p_knn - yq) ** 2))}
        res.append(r)
        all_y.append(yq)
        all_p.append(p)
        all_m.append(p_mean)
        all_k.append(p_knn)
        out(f"task {r['task']:<40} ctx={r['n_ctx']:4d} q={r['n_query']:4d} auc={r['auc']:.4f} mse={r['mse']:.4f} "
            f"baseline_mean_mse={r['mean_mse']:.4f} baseline_knn_auc={r['knn_auc']:.4f} baseline_knn_mse={r['knn_mse']:.4f}")
    if not res:
        raise SystemExit("no task has both context and query rows (tasks are (dataset, model, step))")
    y, p, m, k = map(np.concatenate, (all_y, all_p, all_m, all_k))
    overall = {"auc": float(np.nanmean([r["auc"] for r in res])), "mse": float(np.mean((p - y) ** 2)),
               "baseline_mean_mse": float(np.mean((m - y) ** 2)),
               "baseline_knn_auc": float(np.nanmean([r["knn_auc"] for r in res])),
               "baseline_knn_mse": float(np.mean((k - y) ** 2)), "tasks": res}
    out(f"(auc: mean of within-task AUCs over {len(res)} tasks; mse: over all {len(y)} queries; "
        f"baseline_knn_mse={overall['baseline_knn_mse']:.4f})")
    out(f"overall auc={overall['auc']:.4f} mse={overall['mse']:.4f} baseline_mean_mse={overall['baseline_mean_mse']:.4f} "
        f"baseline_knn_auc={overall['baseline_knn_auc']:.4f}")
    return overall


def main(args: EvalArgs):
    model, backbone = V0.load_v0(args.ckpt)
    held = Path(args.ckpt) / "heldout"
    queries = args.queries or (held / "queries.jsonl" if (held / "queries.jsonl").exists() else None)
    if queries is None:
        raise SystemExit(f"--queries: give the rows to predict (none held out in {held}; train with "
                         "`python benchmarks/v0_eval.py train --holdout 0.2` to make some)")
    context = args.context or (held / "context.jsonl" if (held / "context.jsonl").exists()
                               else Path(args.prompts).parent / "context.jsonl")
    prompts = V0.read_prompts(args.prompts)
    backbone.use_disk_cache(args.prompts)
    print(f"context {context}, queries {queries}")
    return evaluate_v0(model, backbone, prompts, V0.read_rows(context, prompts), V0.read_rows(queries, prompts),
                       args.max_context, args.seed)


if __name__ == "__main__":
    C.run_command({"train": (train_with_holdout, HoldoutTrainArgs)}, main, EvalArgs)  # `v0_eval.py [train] [flags]`
