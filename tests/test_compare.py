"""benchmarks/compare.py, issue 28's controlled comparison: the budget split, the run-folder logic (skip, resume,
start again), the statistics over seeds and the table, on hand-written metrics.jsonl files; and (slow) the whole
pipeline on the tiny budget for all seven methods."""
import json
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402


def write_run(folder, rows, args=None, method="grpo"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args is not None:
        (folder / "config.json").write_text(json.dumps({"method": method, "commit": None, "args": args}))


def rows_of(evals: dict, steps: int, rollouts: int = 32, mse=None, time_step=10.0, **extra) -> list[dict]:
    """step 0 (evaluation) and steps 1..steps; eval_acc where evals says."""
    rows = [{"step": 0, "eval_acc": evals.get(0)}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "acc": 0.5, "rollouts": rollouts, "baseline_mse": mse, "eval_acc": evals.get(s),
                     "time_gen": 2.0, "time_train": 3.0, "time_step": time_step, **extra})
    return rows


def saved(method="grpo", **kw):
    """config.json's args as the scripts write them (typed values) for the comparison's default flags."""
    a = compare.parse(["--out", "/tmp/unused"])
    args = {f[2:].replace("-", "_"): v for f, v in compare.run_flags(method, a).items()}
    args = {k: (int(v) if v.isdigit() else v) for k, v in args.items()}
    return {**args, "seed": 0, "model": "smollm2-135m", **kw}


# ---------------------------------------------------------------- the budget


def test_every_method_spends_the_same_rollouts_a_step():
    a = compare.parse(["--out", "/tmp/unused"])
    spent = {}
    for m in compare.ORDER:
        f = compare.run_flags(m, a)
        assert f["--steps"] == "20" and f["--oracle-k"] == "8" and f["--data"] == "arith" and f["--preset"] == "cpu"
        spent[m] = int(f["--prompts-per-step"]) * int(f.get("--group-size", 1))
    assert {m: spent[m] for m in spent if m != "v05"} == {"grpo": 32, "ppo": 32, "v0": 32, "dvpo": 32, "genac": 32,
                                                          "poise": 32}
    # V0.5 adapts: the prompts whose expected spend (prompts x its mean k) is closest to the budget
    p = int(compare.run_flags("v05", a)["--prompts-per-step"])
    assert abs(p * compare.V05_K_MEAN - 32) <= min(abs(q * compare.V05_K_MEAN - 32) for q in range(1, 33))
    # POISE's probe switches on after as many rows as at its defaults (8 x 2 a step: steps 8 and 16)
    f = compare.run_flags("poise", a)
    assert int(f["--warmup-steps"]) * 32 == 8 * 16 and int(f["--rloo-steps"]) * 32 == 16 * 16
    assert compare.run_flags("v0", a)["--alloc"] == "v0"
    with pytest.raises(SystemExit, match="multiple of 4"):
        compare.rollout_flags("grpo", 30)


def test_tiny_adds_each_methods_own_small_flags():
    a = compare.parse(["--out", "/tmp/unused", "--tiny", "--dry-run"])
    assert (a.steps, a.budget, a.oracle_k) == (2, 4, 2)
    f = compare.run_flags("genac", a)
    assert f["--sft-problems"] == "2" and f["--max-new-tokens"] == "6" and f["--model"].endswith("tiny-model")
    assert compare.run_flags("poise", a)["--rloo-steps"] == "1"  # the tiny value wins over the scaled one


# ---------------------------------------------------------------- run folders


def test_finished_runs_are_skipped_checkpointed_ones_resumed_others_started_again(tmp_path):
    a = compare.parse(["--out", str(tmp_path)])
    f = lambda m, s=0: compare.folder_of(a.out, m, s)  # noqa: E731
    assert compare.plan("grpo", 0, a)[0] == "fresh"
    write_run(f("grpo"), rows_of({0: 0.3, 20: 0.6}, 20), saved())
    what, cmd, _ = compare.plan("grpo", 0, a)
    assert what == "skip"
    assert cmd[1].endswith("grpo.py") and cmd[cmd.index("--out") + 1] == str(f("grpo"))
    write_run(f("ppo"), rows_of({0: 0.3}, 7), saved("ppo"), "ppo")  # killed at step 7, checkpoint of step 5
    (f("ppo") / "ckpt").mkdir()
    (f("ppo") / "ckpt" / "state.pt").write_bytes(b"")
    (f("ppo") / "ckpt" / "meta.json").write_text('{"step": 5}')
    what, cmd, why = compare.plan("ppo", 0, a)
    assert what == "resume" and cmd[-1] == "--resume" and "step 5" in why
    write_run(f("poise"), rows_of({0: 0.3}, 2), saved("poise"), "poise")  # killed before its first checkpoint
    what, cmd, _ = compare.plan("poise", 0, a)
    assert what == "overwrite" and cmd[-1] == "--overwrite"
    (f("dvpo") / "gvm").mkdir(parents=True)  # DVPO killed in stage 1: dvpo.py --resume continues it
    (f("dvpo") / "gvm" / "config.json").write_text("{}")
    assert compare.plan("dvpo", 0, a)[0] == "resume"
    (f("genac") / "sft").mkdir(parents=True)  # GenAC killed in stage 1: its stages start again
    (f("genac") / "sft" / "config.json").write_text("{}")
    assert compare.plan("genac", 0, a)[0] == "overwrite"
    (f("genac") / "sft" / "ckpt" / "critic").mkdir(parents=True)  # killed after stage 1: genac.py --resume skips it
    what, _, why = compare.plan("genac", 0, a)
    assert what == "resume" and why == "stage 1 finished"
    # a finished run made with other settings is not taken for this comparison's
    write_run(f("grpo", 1), rows_of({20: 0.5}, 20), saved(seed=1, oracle_k=4))
    with pytest.raises(SystemExit, match=r"--oracle-k 4 \(saved\) -> '8' \(now\)"):
        compare.plan("grpo", 1, a)
    # operational flags may differ (common.OPERATIONAL), and --overwrite redoes a finished run
    write_run(f("grpo", 2), rows_of({20: 0.5}, 20), saved(seed=2, eval_every=1, micro_batch_size=2))
    assert compare.plan("grpo", 2, a)[0] == "skip"
    assert compare.plan("grpo", 2, compare.parse(["--out", str(tmp_path), "--overwrite"]))[0] == "overwrite"
    # the dry run lists every run and runs nothing
    assert compare.run_all(compare.parse(["--out", str(tmp_path), "--dry-run", "--seeds", "0"])) == []
    assert not (f("v05") / "compare.log").exists()


def test_a_cut_last_line_is_dropped_and_a_bad_line_before_it_is_named(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "acc')
    assert [r["step"] for r in compare.read_rows(p)] == [0, 1]
    p.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2"):
        compare.read_rows(p)


def test_prune_keeps_the_record_and_deletes_checkpoints(tmp_path):
    run = tmp_path / "genac" / "seed0"
    for d in ("ckpt", "ckpt-5", "sft/ckpt", "pretrain/ckpt"):
        (run / d).mkdir(parents=True)
    write_run(run, rows_of({}, 1))
    compare.prune(run)
    assert sorted(p.name for p in run.rglob("*")) == ["metrics.jsonl", "pretrain", "sft"]


# ---------------------------------------------------------------- statistics and the table


def test_t_interval_is_students_over_seeds():
    x = [0.5, 0.6, 0.7]
    m, lo, hi = compare.t_interval(x)
    # by hand: s = 0.1, t_{0.975, 2} = 4.302653, half = 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert m == pytest.approx(0.6) and lo == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert hi == pytest.approx(0.848414, abs=1e-6)
    assert (lo, hi) == pytest.approx(stats.t.interval(0.95, 2, loc=np.mean(x), scale=stats.sem(x)))
    y = [0.2, 0.9, 0.4, 0.45, 0.61]
    assert compare.t_interval(y)[1:] == pytest.approx(stats.t.interval(0.95, 4, loc=np.mean(y), scale=stats.sem(y)))
    assert compare.t_interval([0.4]) == (0.4, None, None)  # one seed: no interval


def test_report_aggregates_seeds_into_the_table_and_figure(tmp_path):
    out = tmp_path / "cmp"
    for s, (before, mid, after) in enumerate([(0.30, 0.40, 0.5), (0.32, 0.50, 0.6), (0.28, 0.45, 0.7)]):
        write_run(out / "grpo" / f"seed{s}", rows_of({0: before, 10: mid, 20: after}, 20, mse=0.01 * (s + 1)),
                  saved(seed=s))
    write_run(out / "grpo" / "seed3", rows_of({0: 0.3}, 9), saved(seed=3))  # not finished: left out, named
    write_run(out / "ppo" / "seed0", rows_of({0: 0.3, 20: 0.55}, 20, mse=0.02), saved("ppo"), "ppo")
    g = out / "genac" / "seed0"
    write_run(g, rows_of({0: 0.3, 20: 0.4}, 20, critic_queries=96, critic_tokens=900), saved("genac"), "genac")
    write_run(g / "sft", [{"step": 0, "sft_continuations": 40}], {"sft_problems": 16, "sft_n": 4})
    write_run(g / "pretrain", [{"step": 1}], {"pretrain_steps": 3, "prompts_per_step": 32, "group_size": 1})
    v = out / "v05" / "seed0"  # V0.5 spends what it decides: 30 and 38 rollouts a step
    write_run(v, [{"step": 0, "eval_acc": 0.3}] + [{"step": s, "rollouts": 30 if s % 2 else 38, "time_step": 1.0,
                                                   "eval_acc": 0.5 if s == 20 else None} for s in range(1, 21)])
    (g / "compare_time.json").write_text(json.dumps({"process_s": 1200.0, "sittings": 2}))
    md = compare.report(compare.parse(["--out", str(out), "--report"]))

    lines = md.splitlines()
    assert len(lines) == 2 + 7 and all(l.startswith("| ") for l in lines)  # header, rule, one row per method
    row = {m: next(l for l in lines if f"[{compare.LABEL[m]}]" in l) for m in compare.ORDER}
    cells = {m: [c.strip() for c in row[m].split("|")[1:-1]] for m in row}
    lo, hi = 0.6 - 0.248414, 0.6 + 0.248414  # the interval of test_t_interval_is_students_over_seeds
    assert cells["grpo"][1] == "8 x 4 -> 32.0" and cells["grpo"][2] == "3" and cells["grpo"][3] == "0.300"
    assert cells["grpo"][4] == f"0.600 [{lo:.3f}, {hi:.3f}]"
    assert cells["grpo"][5] == str(20 * 32) and cells["grpo"][7] == "0.0200"  # mean of 0.01, 0.02, 0.03
    assert cells["grpo"][6] == f"{200 / 60:.1f} / {100 / 60:.1f} / -"  # sum time_step / timed phases / process
    assert cells["ppo"][4] == "0.550 (n=1)"
    assert cells["v05"][1].endswith("-> 34.0") and cells["v05"][5] == "680"
    assert "critic: 1920 queries, 18000 tokens" in cells["genac"][8] and "stage 1: 64 rollouts + 40 continuations" in cells["genac"][8]
    assert "stage 2: 96 rollouts" in cells["genac"][8] and cells["genac"][6].endswith("/ 20.0")
    assert cells["dvpo"][2] == "not run" and cells["poise"][2] == "not run"
    text = (out / "compare.md").read_text()
    assert md in text and "grpo seed 3 (step 9 of 20)" in text
    assert (out / "compare.png").stat().st_size > 10_000
    res = json.loads((out / "compare.json").read_text())
    curve = res["grpo"]["curve"]  # step: [mean, low, high, n, mean training time]
    assert sorted(curve, key=int) == ["0", "10", "20"] and curve["10"][0] == pytest.approx(0.45)
    assert curve["20"][3] == 3 and curve["20"][4] == pytest.approx(20 * 5.0)


# ---------------------------------------------------------------- end to end, tiny


@pytest.mark.slow
def test_tiny_comparison_runs_all_seven_then_skips_them_and_reports(tmp_path):
    """compare.py itself in this process (run_script); each method's run is its own subprocess, as for a user."""
    out = tmp_path / "cmp"
    cmd = ["benchmarks/compare.py", "--tiny", "--out", str(out), "--seeds", "0"]
    run_script(*cmd)
    for m in compare.ORDER:
        run = out / m / "seed0"
        rows = compare.read_rows(run / "metrics.jsonl")
        assert rows[-1]["step"] == 2 and rows[-1]["eval_acc"] is not None, m
        assert not list(run.rglob("ckpt*")), m  # pruned once finished
    again = run_script(*cmd)
    assert again.stdout.count(": skip (finished (step 2))") == 7 and "running" not in again.stdout
    run_script(*cmd, "--report")
    rows = [l for l in (out / "compare.md").read_text().splitlines() if l.startswith("| [")]
    assert len(rows) == 7 and not any("not run" in r or "not finished" in r for r in rows)
    assert all("(n=1)" in r for r in rows) and (out / "compare.png").exists()
