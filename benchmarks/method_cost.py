"""Cost of one training step, method against method, on the same settings in one session.

Each method runs as its own process (so its peak memory is its own) for --steps steps on the same
prompts, group size and response length; the first step is warm-up and left out of the median.

    python benchmarks/method_cost.py                       # grpo vs ppo, 8 prompts x 4 rollouts x 32 tokens
    python benchmarks/method_cost.py --methods grpo ppo --steps 4 --new-tokens 64
    python benchmarks/method_cost.py --methods ppo dvpo     # DVPO's claim: its stage 2 against PPO
    python benchmarks/method_cost.py --methods ppo genac    # GenAC's cost: its joint stage against PPO

dvpo runs its stage 2 (`dvpo.py train`) against a GVM made first by a small, untimed stage 1: DVPO pays
for the GVM once, not per policy step, and a GVM's cost per step does not depend on how well it was trained.
genac runs its stage 3 (`genac.py train`) from a critic given a small, untimed SFT first, so that it writes
answers of its trained length (a zero-shot critic rambles to its token limit, which would time something else).

Prints one line per method, then the ratios against the first method. Peak memory is the process's
peak RSS on CPU (GPU: max allocated), so it includes the Python runtime and libraries (about 0.5 GB).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def method_command(method, a, tmp: Path) -> list[str]:
    """The command whose steps are timed; dvpo and genac first make, untimed, what their stage 2/3 starts from."""
    if method not in ("dvpo", "genac"):
        return [sys.executable, str(ROOT / f"{method}.py")]
    first = {"dvpo": ["pretrain", "--collect-problems", "8", "--collect-n", "2"],
             "genac": ["sft", "--sft-problems", "8", "--sft-n", "2", "--sft-epochs", "1"]}[method]
    p = subprocess.run([sys.executable, str(ROOT / f"{method}.py"), *first, "--max-new-tokens", str(a.new_tokens),
                        "--seed", str(a.seed), "--out", str(tmp / "stage1"), *a.extra],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{method} {first[0]} failed:\n{p.stderr[-2000:]}")
    if method == "dvpo":
        return [sys.executable, str(ROOT / "dvpo.py"), "train", "--gvm", str(tmp / "stage1")]
    return [sys.executable, str(ROOT / "genac.py"), "train", "--critic", str(tmp / "stage1" / "ckpt" / "critic")]


def run_method(method, a, out):
    cmd = [*method_command(method, a, out.parent / f"{method}_stage1"), "--steps", str(a.steps), "--prompts-per-step", str(a.prompts),
           "--group-size", str(a.group), "--max-new-tokens", str(a.new_tokens), "--eval-problems", "0",
           "--seed", str(a.seed), "--out", str(out), *a.extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{method} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] > 0]
    steady = rows[1:] or rows
    med = lambda k: statistics.median(r[k] or 0.0 for r in steady)  # noqa: E731
    return {"method": method, "s_per_step": med("time_step"), "gen": med("time_gen"), "train": med("time_train"),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in rows), "acc": statistics.mean(r["acc"] for r in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["grpo", "ppo"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every method")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = [run_method(m, a, Path(tmp) / m) for m in a.methods]
    for r in res:
        print(f"{r['method']:6s} s_per_step={r['s_per_step']:.2f} gen={r['gen']:.2f} train={r['train']:.2f} "
              f"peak_mem_gb={r['peak_mem_gb']:.2f} acc={r['acc']:.3f}")
    base = res[0]
    for r in res[1:]:
        print(f"ratio {r['method']}/{base['method']}: time {r['s_per_step'] / base['s_per_step']:.2f}x "
              f"train {r['train'] / max(base['train'], 1e-9):.2f}x memory {r['peak_mem_gb'] / base['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
