"""GenAC's In-Context Conditioning ablation: the same critic training with and without ICC, then each critic's
value of held-out prompts against their Monte-Carlo success rate under the actor, over seeds.

    python benchmarks/genac_icc.py                 # 3 seeds; stages 1 and 2 twice each (ICC on / off)
    python benchmarks/genac_icc.py --seeds 0 --heldout 32 --oracle-k 8 --extra --pretrain-steps 3

Both critics of a seed see the same rollouts in the same order; only the prompt differs (genac.py --no-icc drops
ICC's instruction to infer the actor's capability and its facts). The held-out prompts come from --eval-data
(arith:test by default), which no stage trains on, and are the same for every seed. p(x) is the mean of --oracle-k
rollouts of the (frozen) actor; a critic's value is the mean of --critic-samples parsed answers, asked with the
settings the stages trained with (genac.py's defaults and --extra), an unparsable answer counting as the running
mean it was trained with, as in genac.py. A seed changes the stages' problems, rollouts and updates and p(x)'s
samples. Prints each critic's MSE and, for reference, the best constant's (the held-out mean p); with several
seeds, their means with a 95% Student's t interval and the paired differences. Each seed's numbers go to
OUT/seed<k>.json as it finishes; a seed already there is read, not re-run, once its settings are checked.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import genac  # noqa: E402
from compare import seed_results, t_interval  # noqa: E402  (benchmarks/compare.py: seed files, Student's t)


def stage_flags(icc: bool, a) -> list[str]:
    return ["--seed", str(a.seed), *([] if icc else ["--no-icc"]), *a.extra]


def train_critic(icc: bool, a, out: Path) -> Path:
    """genac.py sft, then pretrain from its critic; returns the stage 2 critic folder."""
    base, flags = [sys.executable, str(ROOT / "genac.py")], stage_flags(icc, a)
    for stage, more in (("sft", []), ("pretrain", ["--critic", str(out / "sft" / "ckpt" / "critic")])):
        p = subprocess.run([*base, stage, *flags, *more, "--out", str(out / stage)], capture_output=True, text=True,
                           cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"genac.py {stage} ({'icc' if icc else 'no icc'}) failed:\n{p.stderr[-2000:]}")
    return out / "pretrain" / "ckpt" / "critic"


def critic_values(folder: Path, icc: bool, problems, a, tok, actor) -> tuple[np.ndarray, float]:
    """Mean parsed value of the empty state of each problem over --critic-samples samples; the parse-fail share."""
    model, _, path = C.load_model(str(folder))
    ema = C.read_state(folder.parent / "state.pt")["extra"]["ema"]
    sampler = C.make_sampler("hf", model, tok, path, torch.float32)
    args = C.parse_args(genac.Args, stage_flags(icc, a))  # the settings the stages ran with
    states = [genac.State(p.question, "", args.max_new_tokens) for p in problems] * a.critic_samples
    v, ok, _ = genac.query_critic(sampler, tok, states, args, actor, ema, seed=a.seed + 5)
    return v.view(a.critic_samples, len(problems)).mean(0).numpy(), float(1 - ok.float().mean())


SETTINGS = ("heldout", "oracle_k", "critic_samples", "eval_data", "extra")  # what a seed's numbers depend on


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--oracle-k", type=int, default=12)
    ap.add_argument("--critic-samples", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--eval-data", default="arith:test")
    ap.add_argument("--out", default="runs/genac_icc", help="folder: seed<k>.json per seed, summary.json")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to both genac.py stages")
    a = ap.parse_args(argv)
    results = seed_results(a, SETTINGS, one_seed)
    summary = summarise(results)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    if len(results) > 1:  # one seed has no interval
        print(f"MSE against p_MC over seeds {a.seeds} (mean [95% t interval]):")
        for name, (m, lo, hi) in summary.items():
            print(f"{name:>20}: {m:.4f} [{lo:.4f}, {hi:.4f}]")
    return summary


def summarise(results: list[dict]) -> dict:
    """Each critic's and the constant's MSE over seeds, and the paired differences (the paper: ICC lowers it)."""
    mse = {name: [res[name]["mse"] for res in results] for name in ("icc", "no_icc")}
    mse["constant"] = [res["constant_mse"] for res in results]
    summary = {name: t_interval(v) for name, v in mse.items()}
    summary["icc - no_icc"] = t_interval(np.subtract(mse["icc"], mse["no_icc"]))
    summary["icc - constant"] = t_interval(np.subtract(mse["icc"], mse["constant"]))
    return summary


def one_seed(a) -> dict:
    """One seed: both critics trained from it, and their MSE against p_MC on the held-out prompts."""
    ga = C.parse_args(genac.Args, stage_flags(True, a))
    policy, tok, path = C.load_model(ga.model)
    actor = (Path(ga.model).name if Path(ga.model).exists() else ga.model, sum(p.numel() for p in policy.parameters()))
    problems = C.load_problems(a.eval_data, a.heldout)
    p_mc = C.success_rates(C.HFSampler(policy, tok), tok, problems, a.oracle_k, ga.max_new_tokens, ga.temperature,
                           seed=a.seed + 3)
    res = {"seed": a.seed, "heldout": len(problems), "p_mean": float(p_mc.mean()),
           "constant_mse": float(np.mean((p_mc - p_mc.mean()) ** 2))}
    with tempfile.TemporaryDirectory() as tmp:
        for icc in (True, False):
            folder = train_critic(icc, a, Path(tmp) / ("icc" if icc else "no_icc"))
            v, fail = critic_values(folder, icc, problems, a, tok, actor)
            name = "icc" if icc else "no_icc"
            res[name] = {"mse": float(np.mean((v - p_mc) ** 2)), "value_mean": float(v.mean()), "parse_fail": fail,
                         "corr": C.pearson(v, p_mc) if v.std() > 0 else None}
            print(f"seed {a.seed} {name:7s} critic MSE vs p_MC = {res[name]['mse']:.4f}  mean value {v.mean():.3f}  "
                  f"parse fail {fail:.2f}", flush=True)
    print(f"seed {a.seed} constant (held-out mean p = {p_mc.mean():.3f}) MSE = {res['constant_mse']:.4f}", flush=True)
    return res


if __name__ == "__main__":
    main()
