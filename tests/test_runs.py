"""Run folders survive what long runs meet: settings recorded and checked on --resume, a folder that holds a run
not overwritten by accident, checkpoints that a kill -9 cannot half-write, a metrics line cut by a crash, bad gold
answers, trackers. The end-to-end kills run every method on the tiny Qwen3 of test_gpu_path (seconds a run)."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import common as C
import grpo
import v05
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def a_run(tmp_path, **kw):
    return grpo.Args(out=str(tmp_path / "run"), **kw)


# ---------------------------------------------------------------- settings and --resume


def test_config_json_records_the_run_and_resume_refuses_other_settings(tmp_path, capsys):
    args = a_run(tmp_path)
    saved = C.start_run(args, "grpo", args.steps)
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())
    assert on_disk == saved and saved["method"] == "grpo" and saved["args"]["lr"] == 3e-5
    assert saved["commit"] is None or len(saved["commit"].rstrip("+")) == 40  # the project's git commit
    with pytest.raises(SystemExit, match=r"--data 'arith' \(saved\) -> 'arith:other' \(now\)\n  --lr 3e-05 \(saved\) -> 1e-05"):
        C.start_run(a_run(tmp_path, lr=1e-5, data="arith:other", resume=True), "grpo", 20)
    changed = C.start_run(a_run(tmp_path, lr=1e-5, resume=True, allow_changed=True), "grpo", 20)
    assert changed["changed_at_resume"] == ["--lr 3e-05 (saved) -> 1e-05 (now)"]
    C.start_run(a_run(tmp_path, lr=1e-5, resume=True, steps=40, micro_batch_size=4), "grpo", 40)  # operational: fine
    with pytest.raises(SystemExit, match="holds a grpo run, not v05"):
        C.start_run(v05.Args(out=str(tmp_path / "run"), resume=True), "v05", 8)
    longer = a_run(tmp_path, lr=1e-5, epochs=2, resume=True)
    with pytest.raises(SystemExit, match=r"--epochs 1 \(saved\) -> 2 \(now\)"):
        C.start_run(longer, "grpo", 20)
    C.start_run(longer, "grpo", 20, free=("epochs",))  # a stage's own length, which --resume may raise (--gvm-epochs)


def test_a_fresh_run_never_overwrites_a_run_and_resume_past_the_end_says_so(tmp_path, capsys):
    args = a_run(tmp_path)
    C.start_run(args, "grpo")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')
    C.save_checkpoint(args.out, 20, {"m": (torch.nn.Linear(2, 2), None)})
    with pytest.raises(SystemExit, match="holds a run.*--overwrite"):
        C.start_run(a_run(tmp_path), "grpo")
    with pytest.raises(SystemExit) as stop:  # the checkpoint is at step 20 = --steps: nothing to do, exit 0
        C.start_run(a_run(tmp_path, resume=True), "grpo", 20)
    assert stop.value.code == 0 and "nothing to train" in capsys.readouterr().out
    C.start_run(a_run(tmp_path, overwrite=True), "grpo")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "ckpt").exists()


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_keep_the_last_n_and_load_without_pickled_code(tmp_path):
    m = torch.nn.Linear(3, 2)
    for step in range(1, 6):
        C.save_checkpoint(str(tmp_path), step, {"m": (m, None)}, {"buf": np.arange(step)}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt-3", "ckpt-4"]
    state = C.load_checkpoint(str(tmp_path), {"m": (m, None)})
    assert state["step"] == 5 and np.array_equal(state["extra"]["buf"], np.arange(5))  # numpy comes back as numpy
    torch.save({"step": 1, "evil": types.SimpleNamespace()}, tmp_path / "ckpt" / "state.pt")  # arbitrary pickle
    with pytest.raises(Exception, match="[Ww]eights only"):
        C.load_checkpoint(str(tmp_path), {"m": (m, None)})


WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
import common as C
m = torch.nn.Linear(512, 512)
step = 0
while True:
    step += 1
    with torch.no_grad():
        m.weight.fill_(step)
    C.save_checkpoint({out!r}, step, {{"m": (m, None)}}, {{"step_again": step}})
    print(step, flush=True)
"""


def test_a_script_run_in_this_process_leaves_common_as_it_was(tmp_path):
    """run_script runs a script in the test process; one that rebinds a name of common for its own run (as
    benchmarks/grpo_step.py does) must not leave it rebound for the tests after it."""
    script = tmp_path / "patches.py"
    script.write_text("import common as C\nC.save_checkpoint = None\nprint(C.save_checkpoint)\n")
    real = C.save_checkpoint
    assert run_script(str(script)).stdout == "None\n"
    assert C.save_checkpoint is real


def test_kill_9_during_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path):
    """A writer saves checkpoints in a loop and is killed with SIGKILL at 8 moments; each time the folder loads,
    and what it holds is one step's, whole (weights, state and meta agree)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT), out=str(tmp_path / "run")))
    m = torch.nn.Linear(512, 512)
    for delay in (0.0, 0.03, 0.07, 0.1, 0.13, 0.17, 0.2, 0.25):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # a first checkpoint is written; the kill lands somewhere in the next ones
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = C.load_checkpoint(str(tmp_path / "run"), {"m": (m, None)})
        assert state["extra"]["step_again"] == state["step"] and m.weight.unique().tolist() == [state["step"]]


def test_a_crash_inside_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = torch.nn.Linear(2, 2)
    C.save_checkpoint(str(tmp_path), 1, {"m": (m, None)})
    real = os.replace

    def crash_at_the_swap(src, dst):
        if str(src).endswith("ckpt.tmp"):
            raise OSError("disk full")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", crash_at_the_swap)
    with pytest.raises(OSError):
        C.save_checkpoint(str(tmp_path), 2, {"m": (m, None)})
    monkeypatch.setattr(os, "replace", real)
    assert C.load_checkpoint(str(tmp_path), {"m": (m, None)})["step"] == 1  # ckpt.old, whole


def test_a_metrics_line_cut_by_a_crash_is_dropped_and_a_bad_one_before_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    C.keep_steps(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2"):
        C.keep_steps(path, 3)


# ---------------------------------------------------------------- data and trackers


def test_bad_gold_answers_are_counted_left_out_and_refused_when_all_bad(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [{"question": "1+1?", "answer": "2"},
                                                      {"question": "2+2?", "answer": "  "},
                                                      {"question": "3+3?", "answer": "\\boxed{}"}]))
    assert [p.answer for p in C.load_problems(str(rows))] == ["2"]
    assert "2 of 3 problems left out" in capsys.readouterr().out
    rows.write_text(json.dumps({"question": "2+2?", "answer": ""}))
    with pytest.raises(SystemExit, match="no gold answer can be read"):
        C.load_problems(str(rows))
    assert len(C.load_problems(str(ROOT / "data" / "eval" / "math500.jsonl"))) == 500  # '\\$18.90' reads as 18.90


def test_report_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    seen = []

    class Writer:
        def __init__(self, logdir):
            seen.append(("dir", logdir))

        def add_scalar(self, k, v, step):
            seen.append((k, v, step))

        def flush(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    C.RunLogger(str(tmp_path / "tb"), 0, "tensorboard").log(1, {"reward": 0.5, "note": "x"})
    assert ("dir", str(tmp_path / "tb" / "tensorboard")) in seen and ("reward", 0.5, 1) in seen
    assert not any(s[0] == "note" for s in seen)  # numbers only
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(log=lambda d, step: logged.append((step, d))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    C.RunLogger(str(tmp_path / "wb"), 0, "wandb").log(2, {"acc": 0.25})
    assert logged[0][0] == 2 and logged[0][1]["acc"] == 0.25
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="pip install wandb"):
        C.RunLogger(str(tmp_path / "wb2"), 0, "wandb")


# ---------------------------------------------------------------- kill -9 mid-run, then --resume, every method

# every method's paper preset (test_gpu_path runs the same with vLLM), shrunk to seconds
TINY = ["--preset", "paper", "--data", "arith", "--eval-data", "arith:test", "--eval-problems", "2", "--eval-n", "2",
        "--steps", "4", "--save-every", "1", "--prompts-per-step", "2", "--max-new-tokens", "6", "--micro-batch-size",
        "2", "--sampler", "hf", "--thinking", "off"]
OWN = {"grpo": ["--group-size", "2"], "ppo": ["--critic-model", ""],
       "dvpo": ["--gvm-model", "", "--collect-problems", "2", "--collect-n", "2"],
       "genac": ["--critic", "", "--sft-problems", "2", "--sft-n", "2", "--pretrain-steps", "1", "--segment", "3",
                 "--critic-max-tokens", "4"], "poise": ["--warmup-steps", "1", "--rloo-steps", "2"],
       "v05": ["--prior", "constant", "--k-max", "6"]}
VOLATILE = ("time_", "peak_mem_gb")


def rows_of(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def qwen3(module_dir):
    return gpu_check.qwen3_folder(module_dir("qwen3") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OWN))
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_metrics(method, qwen3, tmp_path):
    """The killed run needs a process of its own; the uninterrupted one and the resumption run in this process
    (conftest.run_script), so the rows also show that a fresh run with the same seed gives the same numbers."""
    flags = ["--model", str(qwen3), *TINY, *OWN[method]]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_script(f"{method}.py", *flags, "--out", str(whole))
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{method}.py"), *flags, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = cut / "ckpt" / "meta.json"
    while proc.poll() is None and not (meta.exists() and json.loads(meta.read_text())["step"] >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    done = json.loads(meta.read_text())["step"]
    assert done < 4
    run_script(f"{method}.py", *flags, "--out", str(cut), "--resume")
    assert rows_of(cut) == rows_of(whole)
    last = rows_of(whole)[-1]
    assert last["step"] == 4 and 0.0 <= last["clipped_ratio"] <= 1.0 and last["eval_acc"] is not None
