"""GenAC's In-Context Conditioning ablation: the same critic training with and without ICC, then each critic's
value of held-out prompts against their Monte-Carlo success rate under the actor.

    python benchmarks/genac_icc.py                 # stages 1 and 2 twice (ICC on / off), 48 held-out prompts
    python benchmarks/genac_icc.py --heldout 32 --oracle-k 8 --extra --pretrain-steps 3

Both critics see the same rollouts in the same order (same seed); only the prompt differs (genac.py --no-icc
drops ICC's instruction to infer the actor's capability and its facts). The held-out prompts come from
--eval-data (arith:test by default), which no stage trains on. p(x) is the mean of --oracle-k rollouts of the
(frozen) actor; a critic's value is the mean of --critic-samples parsed answers, asked with the settings the
stages trained with (genac.py's defaults and --extra), an unparsable answer counting as the running mean it
was trained with, as in genac.py. Prints one line per critic and, for reference, the MSE of the best constant
(the held-out mean p).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--oracle-k", type=int, default=12)
    ap.add_argument("--critic-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-data", default="arith:test")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to both genac.py stages")
    a = ap.parse_args()
    ga = C.parse_args(genac.Args, stage_flags(True, a))
    policy, tok, path = C.load_model(ga.model)
    actor = (Path(ga.model).name if Path(ga.model).exists() else ga.model, sum(p.numel() for p in policy.parameters()))
    problems = C.load_problems(a.eval_data, a.heldout)
    p_mc = C.success_rates(C.HFSampler(policy, tok), tok, problems, a.oracle_k, ga.max_new_tokens, ga.temperature,
                           seed=a.seed + 3)
    res = {"heldout": len(problems), "oracle_k": a.oracle_k, "p_mean": float(p_mc.mean()),
           "constant_mse": float(np.mean((p_mc - p_mc.mean()) ** 2))}
    with tempfile.TemporaryDirectory() as tmp:
        for icc in (True, False):
            folder = train_critic(icc, a, Path(tmp) / ("icc" if icc else "no_icc"))
            v, fail = critic_values(folder, icc, problems, a, tok, actor)
            name = "icc" if icc else "no_icc"
            res[name] = {"mse": float(np.mean((v - p_mc) ** 2)), "value_mean": float(v.mean()), "parse_fail": fail,
                         "corr": float(np.corrcoef(v, p_mc)[0, 1]) if v.std() > 0 else None}
            print(f"{name:7s} critic MSE vs p_MC = {res[name]['mse']:.4f}  mean value {v.mean():.3f}  "
                  f"parse fail {fail:.2f}", flush=True)
    print(f"constant (held-out mean p = {p_mc.mean():.3f}) MSE = {res['constant_mse']:.4f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
