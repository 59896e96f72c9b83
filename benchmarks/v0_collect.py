"""Collect V0's training data: run policies on problems, n rollouts each, and write instruction-performance rows
in the authors' format (v0.py's "Data" section) plus the prompt_dict.json they point into.

    python benchmarks/v0_collect.py --model smollm2-135m --temperatures 0.3,0.7,1.0 --out data/v0_mine/context.jsonl
    python v0.py --data data/v0_mine --out runs/v0_mine

A row's score is the mean of its n rollouts' +-1 rewards; each (policy, temperature) is its own task, and a run
folder of our training scripts (OUT/ckpt/policy) is a policy whose rows carry the checkpoint's step.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import v0 as V0  # noqa: E402
from common import arg  # noqa: E402


@dataclass
class CollectArgs:
    """Run policies on problems (n rollouts each) and write instruction-performance rows + prompt_dict.json."""
    model: str = arg("smollm2-135m", "policies, comma-separated: model names, HF folders, or run folders of our "
                     "scripts (their ckpt/policy; the row's step is the checkpoint's)")
    temperatures: str = arg("0.7", "sampling temperatures, comma-separated; each (policy, T) is its own task")
    data: str = arg("arith", "problems (same forms as the training scripts' --data)")
    problems: int = arg(256, "how many problems")
    skip: int = arg(0, "start at this problem index (disjoint context / query sets from one source)")
    n: int = arg(8, "rollouts per problem (the score is their mean +-1 reward)")
    max_new_tokens: int = arg(48, "response length limit")
    out: str = arg("runs/v0_collect/context.jsonl", "rows file; prompt_dict.json is written (merged) beside it")
    overwrite: bool = arg(False, "replace --out when it exists (a file in the project's data/, say)")
    type: str = arg("context", "the rows' `type` field (the authors use context / train_query)")
    dataset: str = arg("", "dataset name in the rows (default: from --data)")
    sampler: str = arg("auto", "rollout backend", choices=["auto", "hf", "vllm"])
    seed: int = arg(0, "sampling seed")
    device: str = arg("auto", "cpu, cuda, or auto")


def policy_spec(spec: str) -> tuple[str, str, int]:
    """'runs/x' (a run folder) -> (its ckpt/policy, label, step); anything else -> (spec, label, 0)."""
    run = Path(spec)
    if (run / "ckpt" / "state.pt").exists():
        step = C.read_state(run / "ckpt" / "state.pt")["step"]
        return str(run / "ckpt" / "policy"), run.name, int(step)
    return spec, Path(spec).name if Path(spec).exists() else spec, 0


def collect_rows(policy: str, temperature: float, problems: list[C.Problem], ids: list, dataset: str, args,
                 label: str | None = None) -> list[dict]:
    """n rollouts per problem from one policy at one temperature -> rows {id, score, type, model, step, dataset}."""
    path, name, step = policy_spec(policy)
    dev, dtype = C.pick_device(args.device)
    model, tok, mpath = C.load_model(path, dev, dtype)
    sampler = C.make_sampler(args.sampler, model, tok, mpath, dtype, args.seed)
    rates = C.success_rates(sampler, tok, problems, args.n, args.max_new_tokens, temperature, args.seed)
    del sampler, model
    label = label or f"{name}@T{temperature:g}"
    return [{"id": i, "score": round(2 * float(r) - 1, 6), "type": args.type, "model": label, "step": step,
             "dataset": dataset} for i, r in zip(ids, rates)]


def dataset_name(spec: str) -> str:
    return Path(spec.replace(":", "-")).stem


def write_prompts(folder, prompts: dict):
    path = Path(folder) / "prompt_dict.json"
    old = V0.read_prompts(path) if path.exists() else {}
    clash = [k for k in prompts if k in old and old[k] != prompts[k]]
    if clash:
        raise SystemExit(f"{path}: prompt {clash[0]} already holds a different text (use another --dataset name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with C.atomic_file(path) as tmp:
        tmp.write_text(json.dumps({**old, **prompts}, indent=0))


def main(args: CollectArgs):
    C.seed_everything(args.seed)
    dataset = args.dataset or dataset_name(args.data)
    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"--out {args.out} exists: choose another file, or pass --overwrite to replace it")
    problems = C.load_problems(args.data)[args.skip:args.skip + args.problems]
    ids = list(range(args.skip, args.skip + len(problems)))  # the row id = position in --data
    rows = []
    for policy in args.model.split(","):
        for t in map(float, args.temperatures.split(",")):
            t0 = time.perf_counter()
            rows += collect_rows(policy.strip(), t, problems, ids, dataset, args)
            ys = [V0.success_rate(r["score"]) for r in rows[-len(problems):]]
            print(f"{rows[-1]['model']} step {rows[-1]['step']}: mean success {np.mean(ys):.3f}, "
                  f"{np.mean([0 < y < 1 for y in ys]):.2f} of prompts with spread ({time.perf_counter() - t0:.0f} s)")
    write_prompts(Path(args.out).parent, {f"{dataset}_{i}": p.question for i, p in zip(ids, problems)})
    C.write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out} and prompts to {Path(args.out).parent / 'prompt_dict.json'}")
    return rows


if __name__ == "__main__":
    main(C.parse_args(CollectArgs))
