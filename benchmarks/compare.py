"""Issue 28's controlled comparison: all seven methods under one rollout budget, over seeds, from their own scripts.

    python benchmarks/compare.py             # the full comparison: 7 methods, seeds 0 1 2, 20 steps of 32 rollouts
    python benchmarks/compare.py --report    # only read OUT's run folders: OUT/compare.md, OUT/compare.png, the table
    python benchmarks/compare.py --dry-run   # print the commands (and whether each would run, resume or be skipped)
    python benchmarks/compare.py --only grpo ppo --seeds 0     # a subset; the same folders, so it adds up
    python benchmarks/compare.py --tiny --out /tmp/cmp         # the pipeline on a random 2-layer Qwen3 (tests)

What it runs. Each method is a subprocess of its own script (grpo.py, ppo.py, benchmarks/v0_grpo.py --alloc v0,
v05.py, dvpo.py and genac.py with all their stages, poise.py), from the repository root, into OUT/<method>/seed<S>,
with the same --preset cpu, --data, --seed, --steps, --eval-every, --eval-problems and --oracle-k, and a rollout
budget of --budget (32) training rollouts a step, split as below (rollout_flags):
    GRPO 8 prompts x G 4 | PPO, DVPO, GenAC 32 x 1 | POISE 16 x 2 | V0: 32 allocated over 8 prompts (groups of 4..8,
    chosen from 3 x 8 candidates) | V0.5: round(32 / its mean k) prompts, k_init 4 .. k_max 16 each (adaptive).
Every other flag is the script's CPU default, except POISE's --warmup-steps and --rloo-steps (below). Then it reads
every metrics.jsonl and writes OUT/compare.md (the table, for the README), OUT/compare.png (eval_acc against steps
and against training time, with 95% bands over seeds, and the final eval_acc as bars) and OUT/compare.json.

Resumable: a run whose metrics.jsonl reaches --steps (and whose OUT/config.json holds these settings) is skipped;
a run with a checkpoint is continued with --resume (the scripts then refuse settings that differ, naming them);
a folder that holds a run with nothing to continue from (killed before its first checkpoint) is started again with
--overwrite. Stop it at any moment (Ctrl-C stops the run in progress with it) and run the same command again. A
finished run's checkpoints are deleted (--keep-checkpoints keeps them): the record is metrics.jsonl, and 21 runs'
checkpoints would take tens of GB. --overwrite starts the selected runs afresh. genac.py and dvpo.py --resume skip
the stages that finished (dvpo.py also continues a stage 1 cut short; genac.py starts its stage 1 or 2 again).

What is matched
  - Training rollouts a step (the policy's budget), steps, the prompt stream and the evaluation. Every script draws
    its training prompts from common.ProblemStream(--data, --seed), so at one seed every method's first prompts are
    the same ones in the same order; a method that takes more prompts a step (PPO's 32 against GRPO's 8) goes
    further into the same stream. V0 draws 3 candidates per prompt it trains on, V0.5 only the prompts it trains on.
  - The model, the response length, temperature, learning rate, one optimizer step per batch: common.CPU, which
    every script's --preset cpu shares.
  - baseline_mse: --oracle-k fresh rollouts per training prompt, kept out of training, give a Monte-Carlo p(x) that
    each method's baseline is measured against (GRPO's group mean, PPO's and DVPO's V(s_0), GenAC's critic on the
    empty response, V0.5's fused mu, POISE's sibling-probe or RLOO baseline), on that method's own prompts.
What cannot be matched, and is reported beside the budget
  - V0.5 decides its own spend: its prompts are chosen so that its expected spend is closest to the budget
    (V05_K_MEAN, from docs/v05.md's runs); the table shows what it spent.
  - DVPO's stage 1 (the GVM's --collect-problems x --collect-n rollouts) and GenAC's stages 1 and 2 (SFT traces
    from --sft-problems x --sft-n rollouts plus continuations, --pretrain-steps x prompts a step rollouts) come before
    the policy's first step; GenAC's critic queries and tokens (every --segment tokens of every rollout) are spent
    in every step. None of it is in `rollouts`: the table's last column counts what the logs record of it.
  - Wall time differs by design (a critic costs time, not rollouts): "wall time" is the sum of the steps'
    time_step, which also holds the oracle's rollouts and the evaluations; "training" is the sum of the timed phases
    (sampling, the method's own phases, the update), without them; "process" is the scripts' whole running time
    as measured here, all stages, model loading and evaluations included (summed over sittings). The oracle asks
    --oracle-k rollouts of every training prompt, so it costs a 32 x 1 method four times GRPO's 8 x 4.
  - v0_grpo.py accepts --oracle-k but does not use it: V0's row has no baseline_mse (its v0_pred_mse, V0's p
    against the groups' observed rates, is another quantity). PPO trains only its critic in step 1 (--critic-warmup 1).
Choices that are ours
  - 32 rollouts a step, 20 steps, seeds 0 1 2, evaluation every 5 steps on 64 arith:test problems (greedy), oracle
    K = 8: the CPU defaults' scale (GRPO's default is 8 x 4 for 20 steps), at a cost of hours on 2 cores.
  - POISE: --warmup-steps and --rloo-steps scaled to the rows its defaults collect (8 and 16 steps of 8 x 2 rollouts:
    128 and 256 rows), i.e. 4 and 8 steps at 16 x 2; unscaled, the probe would train the policy in 4 steps of 20.
  - V0 runs with its defaults (--candidates 3, groups of 4..8, the committed checkpoint); V0.5 with --prior v0.
  - The confidence interval is Student's t over seeds, mean +- t_{0.975, n-1} s / sqrt(n) (s with ddof 1); with one
    seed the table says n=1 and gives no interval. Runs that did not reach their --steps are left out of the
    statistics and named under the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["grpo", "ppo", "v0", "v05", "dvpo", "genac", "poise"]
LABEL = {"grpo": "GRPO", "ppo": "PPO", "v0": "V0 (allocation)", "v05": "V0.5", "dvpo": "DVPO", "genac": "GenAC",
         "poise": "POISE"}
SCRIPT = {"grpo": "grpo.py", "ppo": "ppo.py", "v0": "benchmarks/v0_grpo.py", "v05": "v05.py", "dvpo": "dvpo.py",
          "genac": "genac.py", "poise": "poise.py"}
DOC = {"grpo": "grpo", "ppo": "ppo", "v0": "v0", "v05": "v05", "dvpo": "dvpo", "genac": "genac", "poise": "poise"}
# V0.5's mean rollouts per prompt at its defaults: docs/v05.md, seven seeds of the default run (2600 rollouts over
# 7 x 8 steps x 8 prompts); it sets V0.5's prompts a step so that its expected spend is closest to the budget
V05_K_MEAN = 2600 / (7 * 8 * 8)
# poise.py's defaults: the probe is first fit after 8 steps and used from step 17, at 8 prompts x 2 rollouts a step
POISE_ROWS_WARMUP, POISE_ROWS_RLOO = 8 * 8 * 2, 16 * 8 * 2
# the flags that make each method's run tiny (tests/test_runs.py's OWN); the shared ones are in TINY
TINY = dict(steps=2, budget=4, oracle_k=2, eval_every=1, eval_problems=2)
TINY_FLAGS = {"--max-new-tokens": "6", "--sampler": "hf", "--thinking": "off", "--micro-batch-size": "4",
              "--save-every": "1"}
TINY_OWN = {"dvpo": {"--collect-problems": "2", "--collect-n": "2"},
            "genac": {"--sft-problems": "2", "--sft-n": "2", "--pretrain-steps": "1", "--segment": "3",
                      "--critic-max-tokens": "4"},
            "poise": {"--warmup-steps": "1", "--rloo-steps": "1"}, "v05": {"--k-max": "6"}, "v0": {"--candidates": "2"}}
# flags that change how a run is computed, not what (common.OPERATIONAL): not compared with a finished run's config
OPERATIONAL = {"--out", "--steps", "--save-every", "--eval-every", "--sampler", "--micro-batch-size"}
STAGES = {"dvpo": ["gvm"], "genac": ["sft", "pretrain"]}  # subfolders of the earlier stages (run_all)


# -------------------- the commands ----------------------------------------------------------------


def rollout_flags(method: str, budget: int) -> tuple[dict, str]:
    """The flags that spend `budget` training rollouts a step, and the split in words."""
    if budget % 4:
        raise SystemExit(f"--budget must be a multiple of 4 (GRPO and V0 split it into groups of 4), got {budget}")
    if method == "grpo":
        return {"--prompts-per-step": budget // 4, "--group-size": 4}, f"{budget // 4} x 4"
    if method in ("ppo", "dvpo", "genac"):
        return {"--prompts-per-step": budget, "--group-size": 1}, f"{budget} x 1"
    if method == "poise":
        return ({"--prompts-per-step": budget // 2, "--group-size": 2,
                 "--warmup-steps": max(1, round(POISE_ROWS_WARMUP / budget)),
                 "--rloo-steps": max(1, round(POISE_ROWS_RLOO / budget))}, f"{budget // 2} x 2")
    if method == "v0":
        return ({"--alloc": "v0", "--prompts-per-step": budget // 4, "--group-size": 4},
                f"{budget} over {budget // 4} prompt{'s' if budget > 4 else ''}")
    if method == "v05":
        p = max(1, round(budget / V05_K_MEAN))
        return {"--prompts-per-step": p}, f"{p} x k (4..16), ~{p * V05_K_MEAN:.0f}"
    raise SystemExit(f"unknown method {method!r}: one of {', '.join(ORDER)}")


def run_flags(method: str, a) -> dict:
    """Every flag of one method's run but --seed and --out, in the order they are given (later ones win)."""
    flags = {"--preset": "cpu"}
    if a.model:
        flags["--model"] = a.model
    flags.update({"--data": a.data, "--steps": a.steps, "--eval-every": a.eval_every, "--oracle-k": a.oracle_k})
    if a.eval_data:
        flags["--eval-data"] = a.eval_data
    if a.eval_problems is not None:
        flags["--eval-problems"] = a.eval_problems
    flags.update(rollout_flags(method, a.budget)[0])
    if a.tiny:
        flags.update(TINY_FLAGS)
        flags.update(TINY_OWN.get(method, {}))
    return {k: str(v) for k, v in flags.items()}


def folder_of(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def command(method: str, seed: int, a, extra: tuple = ()) -> list[str]:
    flags = [x for kv in run_flags(method, a).items() for x in kv]
    return [sys.executable, str(ROOT / SCRIPT[method]), *flags, "--seed", str(seed),
            "--out", str(folder_of(a.out, method, seed)), *extra]


# -------------------- run folders: done, resume, start again --------------------------------------


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows. A last line cut short by a kill is dropped (the script drops it too on --resume);
    a bad line before it is an error naming it."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == len(lines) and isinstance(e, json.JSONDecodeError):
                continue
            raise SystemExit(f"{path}:{i}: not a metrics row with a step ({e!r})") from None
        rows.append(row)
    return rows


def last_step(folder: Path) -> int:
    rows = read_rows(folder / "metrics.jsonl")
    return max((int(r["step"]) for r in rows), default=-1)


def checkpointed(folder: Path) -> bool:
    return any((folder / c / "state.pt").exists() for c in ("ckpt", "ckpt.old"))


def saved_args(folder: Path) -> dict | None:
    path = folder / "config.json"
    return json.loads(path.read_text()).get("args") if path.exists() else None


def same_value(saved, given: str) -> bool:
    if isinstance(saved, str) and saved.startswith("OUT"):  # a path inside the run folder (a stage's critic)
        return True
    if saved is None:
        return given == ""
    if isinstance(saved, bool):
        return given.lower() in (("true", "1") if saved else ("false", "0"))
    if isinstance(saved, (int, float)):
        try:
            return float(given) == float(saved)
        except ValueError:
            return False
    return str(saved) == given


def changed_settings(folder: Path, flags: dict) -> list[str]:
    """The flags given that differ from the run's OUT/config.json (operational ones aside), as 'flag saved -> now'."""
    saved = saved_args(folder)
    if saved is None:
        return []
    out = []
    for flag, value in flags.items():
        name = flag[2:].replace("-", "_")
        if flag not in OPERATIONAL and name in saved and not same_value(saved[name], value):
            out.append(f"{flag} {saved[name]!r} (saved) -> {value!r} (now)")
    return out


def plan(method: str, seed: int, a) -> tuple[str, list[str], str]:
    """-> (what to do: skip | resume | overwrite | fresh, the command, why)"""
    folder = folder_of(a.out, method, seed)
    flags = run_flags(method, a)
    step = last_step(folder)
    if a.overwrite and folder.exists():
        return "overwrite", command(method, seed, a, ("--overwrite",)), "--overwrite"
    if step >= a.steps:
        changed = changed_settings(folder, flags)
        if changed:
            raise SystemExit(f"{folder} holds a finished run with other settings than these:\n  " + "\n  ".join(changed)
                             + "\nrun the comparison as it was, choose another --out, or pass --overwrite to redo it")
        return "skip", command(method, seed, a), f"finished (step {step})"
    # with --resume, dvpo.py continues its stage 1 and genac.py skips its stages that finished
    stage = {"dvpo": folder / "gvm" / "config.json", "genac": folder / "sft" / "ckpt" / "critic"}.get(method)
    if checkpointed(folder) or (stage and stage.exists()):
        meta = folder / "ckpt" / "meta.json"
        ck = json.loads(meta.read_text())["step"] if meta.exists() else None
        why = f"checkpoint at step {ck}" if ck is not None else f"stage 1 {'started' if method == 'dvpo' else 'finished'}"
        return "resume", command(method, seed, a, ("--resume",)), why
    held = [p for p in ("metrics.jsonl", "config.json", "ckpt", "ckpt.old", *STAGES.get(method, []))
            if (folder / p).exists()]
    if held:
        return "overwrite", command(method, seed, a, ("--overwrite",)), \
            f"holds {', '.join(held)} but no checkpoint to continue from: started again"
    return "fresh", command(method, seed, a), "new"


def prune(folder: Path):
    """Delete a finished run's checkpoints (OUT/ckpt*, and its stages'); metrics, configs and logs stay."""
    for base in [folder, *(folder / s for s in STAGES.get(folder.parent.name, []))]:
        for p in base.glob("ckpt*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def add_process_time(folder: Path, seconds: float):
    path = folder / "compare_time.json"
    t = json.loads(path.read_text()) if path.exists() else {"process_s": 0.0, "sittings": 0}
    t = {"process_s": t["process_s"] + seconds, "sittings": t["sittings"] + 1}
    path.write_text(json.dumps(t) + "\n")


def run_all(a) -> list[str]:
    """Run (or skip, resume, restart) every selected run, seed by seed; -> the runs that failed."""
    todo = [(m, s) for s in a.seeds for m in a.only]
    plans = [plan(m, s, a) for m, s in todo]  # every folder checked before anything runs
    failed = []
    for i, ((m, s), (what, cmd, why)) in enumerate(zip(todo, plans), 1):
        folder = folder_of(a.out, m, s)
        shown = " ".join(f"'{c}'" if c == "" else c for c in cmd)
        print(f"[{i}/{len(todo)}] {m} seed {s}: {what} ({why})")
        if a.dry_run:
            print(f"    {shown}")
            continue
        if what == "skip":
            if not a.keep_checkpoints:
                prune(folder)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "compare.log"
        t0 = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"\n$ {shown}\n")
            fh.flush()
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
        add_process_time(folder, time.perf_counter() - t0)
        step = last_step(folder)
        if rc != 0 or step < a.steps:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            print(f"    failed (exit {rc}, metrics reach step {step} of {a.steps}); {log}:\n{tail}")
            failed.append(f"{m} seed {s}")
            continue
        print(f"    done in {time.perf_counter() - t0:.0f} s")
        if not a.keep_checkpoints:
            prune(folder)
    return failed


# -------------------- the report -------------------------------------------------------------------


def seed_results(a: argparse.Namespace, keys: tuple, measure) -> list[dict]:
    """Each seed of a.seeds ("0,1,2"), from a.out/seed<k>.json: measure(a with .seed) -> dict runs only where that
    file is missing, and its result is written atomically with the settings (a's values of `keys`), so a benchmark
    over seeds resumes seed by seed. A file measured with other settings is refused, naming them."""
    sys.path.insert(0, str(ROOT))
    import common as C  # here, not at the top: the comparison itself runs without torch
    out, settings = Path(a.out), {k: getattr(a, k) for k in keys}
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        path = out / f"seed{seed}.json"
        if not path.exists():
            res = measure(argparse.Namespace(**vars(a), seed=seed))
            with C.atomic_file(path) as tmp:
                tmp.write_text(json.dumps({"settings": settings, **res}, indent=1))
        results.append(json.loads(path.read_text()))
        changed = [f"--{k.replace('_', '-')} {v!r} (saved) -> {settings.get(k)!r} (now)"
                   for k, v in results[-1]["settings"].items() if settings.get(k) != v]
        if changed:
            raise SystemExit(f"{path} was measured with other settings:\n  " + "\n  ".join(changed) +
                             "\npass them as saved, or choose another --out")
    return results


def t_interval(x, level: float = 0.95):
    """Student's t interval of the mean over seeds: (mean, low, high); (mean, None, None) for one value."""
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, None, None
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - half, m + half


def run_summary(folder: Path, steps: int) -> dict | None:
    """One run folder's numbers, or None when it holds no metrics."""
    rows = read_rows(folder / "metrics.jsonl")
    if not rows:
        return None
    saved = saved_args(folder) or {}
    target = int(saved.get("steps") or steps)
    last = max(int(r["step"]) for r in rows)
    phases = lambda r: sum(v for k, v in r.items() if k.startswith("time_") and k != "time_step"  # noqa: E731
                           and isinstance(v, (int, float)))
    evals, clock, cum = {}, {}, 0.0
    for r in sorted(rows, key=lambda r: r["step"]):
        cum += phases(r)
        if r.get("eval_acc") is not None:
            evals[int(r["step"])], clock[int(r["step"])] = float(r["eval_acc"]), cum
    mse = [r["baseline_mse"] for r in rows if r.get("baseline_mse") is not None]
    timing = folder / "compare_time.json"
    out = {"folder": str(folder), "steps": last, "target": target, "complete": last >= target,
           "eval": evals, "clock": clock, "final": evals.get(last),
           "rollouts": int(sum(r.get("rollouts") or 0 for r in rows)),
           "train_steps": sum(1 for r in rows if r["step"] > 0),
           "wall_s": float(sum(r.get("time_step") or 0 for r in rows if r["step"] > 0)),
           "train_s": float(sum(phases(r) for r in rows)),
           "process_s": json.loads(timing.read_text())["process_s"] if timing.exists() else None,
           "baseline_mse": float(np.mean(mse)) if mse else None, "split": split_of(folder.parent.name, saved),
           "oracle_k": saved.get("oracle_k")}
    if any(r.get("critic_queries") is not None for r in rows):  # GenAC: the critic's own spend, every step
        out["critic_queries"] = int(sum(r.get("critic_queries") or 0 for r in rows))
        out["critic_tokens"] = int(sum(r.get("critic_tokens") or 0 for r in rows))
    gvm = folder / "gvm" / "gvm.json"
    if gvm.exists():  # DVPO stage 1: the scored rollouts the GVM trained (and was measured) on
        out["stage1_rollouts"] = int(json.loads(gvm.read_text())["rows"])
    sft, pre = saved_args(folder / "sft"), saved_args(folder / "pretrain")
    if sft and pre:  # GenAC stages 1 and 2; stage 1's step-0 row counts its continuations
        out["stage1_rollouts"] = int(sft["sft_problems"]) * int(sft["sft_n"])
        first = read_rows(folder / "sft" / "metrics.jsonl")[:1]
        out["stage1_continuations"] = first[0].get("sft_continuations") if first else None
        out["stage2_rollouts"] = int(pre["pretrain_steps"]) * int(pre["prompts_per_step"]) * int(pre["group_size"])
    return out


def split_of(method: str, args: dict) -> str | None:
    """A run's split of its rollouts a step, in words, from its config.json's args (None if they are not there)."""
    p, g = args.get("prompts_per_step"), args.get("group_size")
    if p is None:
        return None
    if method == "v0":
        return f"{p * g} over {p} prompt{'s' if p > 1 else ''}"
    if method == "v05":
        return f"{p} x k ({args.get('k_init')}..{args.get('k_max')}), ~{p * V05_K_MEAN:.0f}"
    return f"{p} x {g}"


def seeds_found(out: Path, method: str) -> list[int]:
    return sorted(int(p.name[4:]) for p in (out / method).glob("seed*") if p.name[4:].isdigit())


def aggregate(out: Path, methods: list[str], seeds: list[int] | None, steps: int) -> dict:
    """Per method: the runs, the seeds that finished, final eval_acc with its t interval, the curve, the spend."""
    res = {}
    for m in methods:
        runs = {}
        for s in (seeds if seeds is not None else seeds_found(out, m)):
            summary = run_summary(folder_of(out, m, s), steps)
            if summary is not None:
                runs[s] = summary
        done = {s: r for s, r in runs.items() if r["complete"]}
        finals = [r["final"] for r in done.values() if r["final"] is not None]
        curve = {}
        for step in sorted({k for r in done.values() for k in r["eval"]}):
            xs = [r["eval"][step] for r in done.values() if step in r["eval"]]
            ts = [r["clock"][step] for r in done.values() if step in r["clock"]]
            curve[step] = (*t_interval(xs), len(xs), float(np.mean(ts)))
        mean = lambda k: (float(np.mean([r[k] for r in done.values() if r.get(k) is not None]))  # noqa: E731
                          if any(r.get(k) is not None for r in done.values()) else None)
        res[m] = {"runs": runs, "seeds": sorted(done), "incomplete": {s: (r["steps"], r["target"])
                                                                       for s, r in runs.items() if not r["complete"]},
                  "final": t_interval(finals) if finals else None, "n": len(finals), "curve": curve,
                  "before": mean_of([r["eval"].get(0) for r in done.values()]),
                  **{k: mean(k) for k in ("rollouts", "train_steps", "wall_s", "train_s", "process_s", "baseline_mse",
                                          "critic_queries", "critic_tokens", "stage1_rollouts", "stage1_continuations",
                                          "stage2_rollouts")},
                  "split": sorted({r["split"] for r in done.values() if r["split"]}),
                  "steps": sorted({r["target"] for r in done.values()}),
                  "oracle_k": sorted({r["oracle_k"] for r in done.values() if r["oracle_k"] is not None})}
    return res


def mean_of(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def fmt_ci(final, n: int) -> str:
    if final is None:
        return "-"
    m, lo, hi = final
    return f"{m:.3f} (n=1)" if lo is None else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_min(s) -> str:
    return "-" if s is None else f"{s / 60:.1f}"


def outside(m: str, r: dict) -> str:
    parts = []
    if r.get("stage1_rollouts") is not None:
        conts = r.get("stage1_continuations")  # None: a GenAC run from before they were logged
        more = f" + {'?' if conts is None else f'{conts:.0f}'} continuations" if m == "genac" else ""
        parts.append(f"stage 1: {r['stage1_rollouts']:.0f} rollouts{more}")
    if r.get("stage2_rollouts") is not None:
        parts.append(f"stage 2: {r['stage2_rollouts']:.0f} rollouts")
    if r.get("critic_queries") is not None:
        parts.append(f"critic: {r['critic_queries']:.0f} queries, {r['critic_tokens']:.0f} tokens")
    return "; ".join(parts) or "-"


def table(res: dict, budget: int) -> str:
    lines = ["| method | rollouts a step: split -> spent | seeds | `eval_acc` before | `eval_acc` after, mean [95% CI] "
             "| rollouts a run | wall time a run, min: steps / training / process | `baseline_mse` | "
             "outside the policy's budget (a run) |", "| --- " * 9 + "|"]
    for m, r in res.items():
        split = ", ".join(r["split"]) or rollout_flags(m, budget)[1]  # the runs' own, else this budget's
        if not r["seeds"]:
            state = "not finished" if r["runs"] else "not run"
            lines.append(f"| [{LABEL[m]}](../docs/{DOC[m]}.md) | {split} | {state} | - | - | - | - | - | - |")
            continue
        spent = f"{r['rollouts'] / r['train_steps']:.1f}" if r["train_steps"] else "-"
        bm = "-" if r["baseline_mse"] is None else f"{r['baseline_mse']:.4f}"
        before = "-" if r["before"] is None else f"{r['before']:.3f}"
        lines.append(f"| [{LABEL[m]}](../docs/{DOC[m]}.md) | {split} -> {spent} | {len(r['seeds'])} | {before} "
                     f"| {fmt_ci(r['final'], r['n'])} | {r['rollouts']:.0f} | {fmt_min(r['wall_s'])} / "
                     f"{fmt_min(r['train_s'])} / {fmt_min(r['process_s'])} | {bm} | {outside(m, r)} |")
    return "\n".join(lines)


def notes(res: dict, a) -> str:
    steps = sorted({x for r in res.values() for x in r["steps"]})
    oracle = sorted({x for r in res.values() for x in r["oracle_k"]})
    out = [f"Seeds {', '.join(str(s) for s in sorted({s for r in res.values() for s in r['seeds']})) or '-'}; "
           f"{' or '.join(map(str, steps)) or a.steps} steps; `eval_acc` on the evaluation set before the first step "
           f"and after the last, mean over seeds with Student's t 95% interval (n=1: one seed, no interval). "
           f"`baseline_mse` is the mean over steps and seeds of each method's baseline against --oracle-k "
           f"{' or '.join(map(str, oracle)) or a.oracle_k} fresh rollouts per prompt (V0's script computes none). "
           "Wall time: the steps' time_step "
           "(oracle and evaluations included) / the timed training phases / the whole process, all stages "
           "(`benchmarks/compare.py`'s docstring)."]
    inc = [f"{m} seed {s} (step {st} of {t})" for m, r in res.items() for s, (st, t) in r["incomplete"].items()]
    if inc:
        out.append("Left out, not finished: " + ", ".join(inc) + ".")
    return "\n\n".join(out)


def figure(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    names = [m for m in res if res[m]["seeds"]]
    for i, m in enumerate(names):
        c = f"C{i}"
        steps = sorted(res[m]["curve"])
        mean = [res[m]["curve"][s][0] for s in steps]
        lo = [res[m]["curve"][s][1] for s in steps]
        hi = [res[m]["curve"][s][2] for s in steps]
        clock = [res[m]["curve"][s][4] / 60 for s in steps]
        ax1.plot(steps, mean, "o-", color=c, label=f"{LABEL[m]} (n={len(res[m]['seeds'])})", ms=3)
        ax2.plot(clock, mean, "o-", color=c, ms=3)
        if all(x is not None for x in lo):
            ax1.fill_between(steps, lo, hi, color=c, alpha=0.15)
            ax2.fill_between(clock, lo, hi, color=c, alpha=0.15)
        f = res[m]["final"]
        err = None if f is None or f[1] is None else [[f[0] - f[1]], [f[2] - f[0]]]
        ax3.bar(i, f[0] if f else 0, yerr=err, color=c, capsize=4)
    ax1.set(xlabel="step", ylabel="eval_acc", title="eval_acc against steps (95% t band over seeds)")
    ax2.set(xlabel="training time, min (mean over seeds; no oracle, no evaluation)", ylabel="eval_acc",
            title="against training time")
    ax3.set_xticks(range(len(names)), [LABEL[m] for m in names], rotation=30, ha="right")
    ax3.set(ylabel="eval_acc after the last step", title="final eval_acc, mean and 95% t interval")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(a) -> str:
    res = aggregate(a.out, a.only, a.report_seeds, a.steps)
    md = table(res, a.budget)
    text = f"# Controlled comparison\n\nMade by `python benchmarks/compare.py`: {a.out}\n\n{md}\n\n{notes(res, a)}\n"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compare.md").write_text(text)
    (a.out / "compare.json").write_text(json.dumps(
        {m: {k: v for k, v in r.items() if k != "runs"} | {"runs": {str(s): x for s, x in r["runs"].items()}}
         for m, r in res.items()}, indent=1, default=str) + "\n")
    figure(res, a.out / "compare.png")
    print(md)
    print(f"\n{notes(res, a)}\n\nwrote {a.out / 'compare.md'}, {a.out / 'compare.png'}, {a.out / 'compare.json'}")
    return md


# -------------------- the command line --------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None, help="the comparison's folder: OUT/<method>/seed<S> (default: runs/compare, "
                    "--tiny: runs/compare-tiny)")
    ap.add_argument("--only", nargs="+", default=ORDER, choices=ORDER, help="methods to run and report")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; --report alone: every "
                    "seed folder found)")
    ap.add_argument("--steps", type=int, default=None, help="steps of every run (default: 20; --tiny: 2)")
    ap.add_argument("--budget", type=int, default=None, help="training rollouts a step, a multiple of 4 (default: 32; "
                    "--tiny: 4)")
    ap.add_argument("--oracle-k", type=int, default=None, help="oracle rollouts per prompt for baseline_mse, 0: off "
                    "(default: 8; --tiny: 2)")
    ap.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 5; --tiny: 1)")
    ap.add_argument("--eval-problems", type=int, default=None, help="evaluation problems (default: the preset's, 64; "
                    "--tiny: 2)")
    ap.add_argument("--eval-data", default=None, help="evaluation problems (default: the preset's, arith:test)")
    ap.add_argument("--data", default="arith", help="training problems, for every method")
    ap.add_argument("--model", default=None, help="policy of every method (default: the preset's, smollm2-135m; "
                    "--tiny: a random 2-layer Qwen3 built in OUT/tiny-model)")
    ap.add_argument("--report", action="store_true", help="only read the run folders and write the report")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and what each would do; run nothing")
    ap.add_argument("--overwrite", action="store_true", help="start the selected runs afresh (their folders' runs are "
                    "deleted by the scripts)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep a finished run's checkpoints")
    ap.add_argument("--tiny", action="store_true", help="the pipeline on a tiny budget: a random 2-layer Qwen3, 2 "
                    "steps of 4 rollouts, 2 evaluation problems, 6 tokens (minutes on CPU; tests/test_compare.py)")
    a = ap.parse_args(argv)
    defaults = dict(TINY) if a.tiny else dict(steps=20, budget=32, oracle_k=8, eval_every=5, eval_problems=None)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.out = Path(a.out or ("runs/compare-tiny" if a.tiny else "runs/compare")).resolve()  # the scripts run in ROOT
    for k in ("data", "eval_data", "model"):  # a path given relative to here, not to ROOT
        if getattr(a, k) and Path(getattr(a, k)).exists():
            setattr(a, k, str(Path(getattr(a, k)).resolve()))
    a.report_seeds = a.seeds
    a.seeds = a.seeds if a.seeds is not None else [0, 1, 2]
    a.only = [m for m in ORDER if m in a.only]
    if a.tiny and a.model is None and not a.report:
        a.model = str(tiny_model(a.out / "tiny-model", dry=a.dry_run))
    return a


def tiny_model(folder: Path, dry: bool = False) -> Path:
    """The random 2-layer Qwen3 that tests/test_gpu_path.py and tests/test_runs.py build, once per OUT."""
    if not (folder / "config.json").exists() and not dry:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import gpu_check
        gpu_check.qwen3_folder(folder)
    return folder


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):  # progress lines show as they happen, also in a log file
        sys.stdout.reconfigure(line_buffering=True)
    a = parse(argv)
    failed = [] if a.report else run_all(a)
    if a.dry_run:
        return
    report(a)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)} (their compare.log has the output); "
                         "run the same command again to continue")


if __name__ == "__main__":
    main()
