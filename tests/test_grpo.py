"""grpo.py as a user runs it: metrics, --help, determinism, --resume, bad input, NaN safety."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import common as C
import grpo
from conftest import ROOT, rolled_back, run_script

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")  # "What is 3 + 1?": every group has reward spread
TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "16",
        "--data", EASY, "--eval-problems", "4", "--seed", "1"]
DESIGN_METRICS = {"reward", "acc", "adv_std", "frac_reward_zero_std", "rollouts", "tokens", "grad_norm", "entropy",
                  "clip_frac", "kl", "baseline_mse", "time_gen", "time_train", "time_step", "peak_mem_gb"}
VOLATILE = {"time_gen", "time_train", "time_step", "peak_mem_gb"}
CKPT_EVERY_STEP = ["--oracle-k", "2", "--save-every", "1", "--keep-checkpoints", "2"]  # the fixture's: resumable at 1


def run(*argv, check=True, env=None):
    return run_script("grpo.py", *argv, check=check, env=env)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(out / "ckpt" / "policy" / "model.safetensors")


@pytest.fixture(scope="module")
def two_step_run(module_dir):
    out = module_dir("grpo2")
    run(*TINY, *CKPT_EVERY_STEP, "--out", str(out))
    return out


@pytest.mark.slow
def test_two_steps_write_every_metric(two_step_run):
    r = rows(two_step_run)
    assert [x["step"] for x in r] == [0, 1, 2]
    for x in r[1:]:
        assert DESIGN_METRICS <= set(x), DESIGN_METRICS - set(x)
        assert x["rollouts"] == 8 and x["reward"] == x["acc"]  # grpo preset: no overlong shaping
        assert x["frac_reward_zero_std"] in (0.0, 0.5, 1.0)  # 2 groups
    assert "eval_acc" in r[0] and "eval_acc" in r[-1]
    assert all(x["grad_norm"] is not None and x["grad_norm"] > 0 for x in r[1:]), "every step must train"
    assert all(x["baseline_mse"] is not None for x in r[1:])


@pytest.mark.slow
def test_checkpoint_policy_loads_as_a_model(two_step_run):
    """README: `--model OUT/ckpt/policy` continues from a run; the folder must carry the tokenizer too."""
    model, tok, _ = C.load_model(str(two_step_run / "ckpt" / "policy"))
    assert tok.chat_template and tok("What is 1 + 1?")["input_ids"]
    assert torch.equal(model.model.embed_tokens.weight, weights(two_step_run)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_help_documents_every_flag():
    text = run("--help").stdout
    for f in dataclasses.fields(grpo.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata.get("help"), f"{flag} has no help text"


@pytest.mark.slow
def test_resume_continues_exactly(two_step_run, tmp_path):
    """The 2-step run as a crash right after its step-1 checkpoint leaves it, resumed to 2: the same metrics and the
    same weights as in one go (weights, optimizer moments, data cursor and RNG all come back). A fresh run with the
    same seed giving the same numbers: tests/test_runs.py, where the killed run matches the uninterrupted one."""
    split = rolled_back(two_step_run, 1, tmp_path / "split")
    state = C.read_state(split / "ckpt" / "state.pt")
    assert state["step"] == 1 and state["optimizers"]["policy"]["state"], "optimizer moments must be saved"
    run(*TINY, *CKPT_EVERY_STEP, "--resume", "--out", str(split))
    a, b = rows(two_step_run), rows(split)
    assert [x["step"] for x in b] == [0, 1, 2]
    keys = lambda x: {k: v for k, v in x.items() if k not in VOLATILE}  # noqa: E731
    assert [keys(x) for x in a] == [keys(x) for x in b]
    wa, wb = weights(two_step_run), weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_one_pass_forward_trains_on_the_shared_prompt_numbers(two_step_run, tmp_path):
    """--no-share-prompts (every rollout's prompt in its own forward pass) against the default, which reads a
    group's prompt once: the same rollouts, rewards and tokens, and the same gradients and entropies to rounding."""
    run(*TINY, "--oracle-k", "2", "--no-share-prompts", "--out", str(tmp_path))
    for one, shared in zip(rows(tmp_path), rows(two_step_run), strict=True):
        assert one.keys() == shared.keys()
        for k in one.keys() - VOLATILE - {"logp_diff"}:
            same = one[k] == shared[k] or one[k] == pytest.approx(shared[k], rel=1e-4, abs=1e-6)
            assert same, (one["step"], k, one[k], shared[k])
        # logp_diff measures float32 rounding itself (trainer vs sampler, ~3e-6): the two paths agree to rounding
        if one.get("logp_diff") is not None:
            assert one["logp_diff"] == pytest.approx(shared["logp_diff"], abs=1e-5) and one["logp_diff"] < 1e-4


@pytest.mark.slow
def test_bench_times_fixed_length_steps():
    """benchmarks/grpo_step.py: every completion is exactly --max-new-tokens long and every row trains (TRL's
    work), no eval, and the last line is the summary other tools parse."""
    # its own process: the benchmark replaces common's sampler, row skipping and checkpoints for its run
    p = run_script("benchmarks/grpo_step.py", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
                   "--max-new-tokens", "6", "--data", EASY, env={})
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("bench median_s_per_step=")
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert set(fields) == {"median_s_per_step", "gen", "train", "peak_mem_gb"} and float(fields["median_s_per_step"]) > 0
    path = next(line for line in p.stdout.splitlines() if line.startswith("bench: per-step metrics in ")).split(" in ")[1]
    r = [json.loads(line) for line in open(path)]
    assert [x["step"] for x in r] == [1, 2]  # no step-0 evaluation
    assert all(x["tokens"] == 2 * 2 * 6 and x["grad_norm"] is not None for x in r)


@pytest.mark.slow
def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    p = run("--resume", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "no checkpoint" in p.stderr


@pytest.mark.slow
def test_missing_model_is_a_clear_error(tmp_path):
    p = run("--model", str(tmp_path / "no-such-model"), check=False)
    assert p.returncode != 0 and "no such folder" in p.stderr
    p = run("--model", str(tmp_path), check=False)  # exists but is no model
    assert p.returncode != 0 and "no config.json" in p.stderr
    p = run("--model", "Qwen3-4B", check=False, env={"HF_HUB_OFFLINE": "1"})  # an alias, with no network
    assert p.returncode != 0 and "--model Qwen3-4B: could not load 'Qwen/Qwen3-4B-Instruct-2507'" in p.stderr


@pytest.mark.slow
def test_malformed_data_fails_fast(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": oops}\n')
    p = run("--data", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "bad.jsonl:2" in p.stderr


def test_flags_that_make_no_sense_are_rejected_naming_the_flag(capsys):
    for argv, msg in [(["--group-size", "1"], "--group-size must be >= 2"),
                      (["--variant", "dapo", "--group-size", "1"], "--group-size must be >= 2"),
                      (["--max-resample", "-1"], "--max-resample must be >= 0"),
                      (["--overlong-buffer", "1.0"], "--overlong-buffer must be 0 (off) or a fraction"),
                      (["--overlong-buffer", "0.01"], "--overlong-buffer must be 0 (off) or a fraction"),
                      (["--dual-clip", "0.5"], "--dual-clip must be 0 (off) or > 1")]:
        with pytest.raises(SystemExit):
            C.parse_args(grpo.Args, argv)
        assert msg in capsys.readouterr().err, argv
    assert grpo.Args(group_size=2, overlong_buffer=0.25).overlong_buffer == 0.25


def test_nan_loss_skips_the_step_and_keeps_the_weights(tiny_lm):
    rolls = [C.Rollout(i, [5, 6, 7], [8 + i, 9, 1], "", [0.0] * 3, "stop") for i in range(4)]
    batch = C.collate(rolls, pad_id=0)
    args = grpo.Args(micro_batch_size=2)
    opt = torch.optim.AdamW(tiny_lm.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    adv = torch.tensor([1.0, -1.0, float("nan"), 0.5])[:, None] * batch["response_mask"]
    st = C.policy_update(tiny_lm, opt, batch, adv, args)
    assert st["nan_skips"] == 1
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.state_dict().items())
    assert not opt.state, "a skipped step must not touch the optimizer moments either"
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5])[:, None] * batch["response_mask"]
    st = C.policy_update(tiny_lm, opt, batch, adv, args)  # a finite loss does update
    assert st["nan_skips"] == 0 and st["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in tiny_lm.state_dict().items())


def test_micro_batches_and_skipped_rows_do_not_change_the_gradient(tiny_lm, monkeypatch):
    """Gradient accumulation over micro-batches, skipping the rows whose advantages are all 0, equals one pass
    over the whole mini-batch with every row, for every aggregation."""
    g = torch.Generator().manual_seed(0)
    rolls = [C.Rollout(i, [5, 6, 7 + i], list(range(10, 12 + i)), "", [0.0] * (2 + i), "length") for i in range(5)]
    batch = C.collate(rolls, pad_id=0)
    adv = torch.randn(5, 1, generator=g) * batch["response_mask"]
    adv[1] = 0.0  # a flat group's row: skipped, yet it counts in the mini-batch's share
    for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]:
        grads = []
        for mbs, skip in ((5, False), (2, True)):
            tiny_lm.zero_grad()
            opt = torch.optim.SGD(tiny_lm.parameters(), lr=0.0)  # lr 0: keep weights, read the grads at step()
            opt.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in tiny_lm.parameters()
                                                       if p.grad is not None]))
            with monkeypatch.context() as m:
                if not skip:  # every row through forward/backward
                    m.setattr(C, "rows_without_signal", lambda adv, ref_logp=None: None)
                C.policy_update(tiny_lm, opt, batch, adv,
                                grpo.Args(micro_batch_size=mbs, loss_agg=agg, max_grad_norm=1e9))
        assert torch.allclose(grads[0], grads[1], atol=1e-6), agg


@pytest.mark.slow
@pytest.mark.parametrize("variant,extra", [
    ("dapo", ["--kl-coef", "0.001", "--epochs", "2", "--minibatch-size", "4", "--dual-clip", "3"]),
    ("drgrpo", ["--data", "arith", "--oracle-k", "2"]),
])
def test_variants_and_options_run(variant, extra, tmp_path):
    """The paths the default run does not take: DAPO's dynamic sampling and overlong shaping, the KL
    reference model, several epochs and mini-batches (frozen logp_old), Dr.GRPO's aggregation."""
    run(*TINY, "--variant", variant, *extra, "--eval-problems", "0", "--out", str(tmp_path))
    r = [x for x in rows(tmp_path) if x["step"] >= 1]
    assert len(r) == 2 and all(x["nan_skips"] == 0 for x in r)
    if variant == "dapo":
        for x in r:  # dynamic sampling: only informative groups are kept, every sampled rollout is counted
            assert x["groups"] <= 2 and x["rollouts"] >= 8 and x["rollouts"] % 4 == 0
            assert x["kl"] > 0 and x["clip_frac"] > 0  # 2 epochs x 2 mini-batches: the policy left pi_ref and pi_old
    else:
        assert all(x["baseline_mse"] is not None for x in r)
