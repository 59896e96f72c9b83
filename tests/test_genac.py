"""genac.py: the critic's prompt with and without ICC, parsing, the critic's reward, segment boundaries and
segment-level GAE by hand, the stage 1 targets, and the three stages end to end with exact resume."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common as C
import genac
from conftest import ROOT

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
TINY = ["--data", EASY, "--max-new-tokens", "12", "--segment", "6", "--critic-max-tokens", "12", "--prompts-per-step",
        "2", "--sft-problems", "3", "--sft-n", "2", "--sft-continuations", "1", "--sft-epochs", "1",
        "--micro-batch-size", "8", "--pretrain-steps", "1", "--eval-problems", "2", "--seed", "1"]


# ---------------------------------------------------------------- the critic's interface


def test_prompt_with_and_without_icc():
    facts = genac.icc_facts("smollm2-135m", 134_515_008, 0.345, 20)
    assert facts == ("The actor is smollm2-135m (135M parameters). Its recent success rate is 34%. "
                     "It has 20 tokens left.")
    assert "(4.0B parameters)" in genac.icc_facts("Qwen3-4B", 4_022_468_096, 0.5, 1)
    with_icc = genac.critic_prompt("What is 2 + 2?", "2 plus 2 ", facts)
    without = genac.critic_prompt("What is 2 + 2?", "2 plus 2 ", None)
    assert facts in with_icc and "actor is" not in without and "success rate is" not in without
    for p in (with_icc, without):
        assert "Problem: What is 2 + 2?" in p and "so far: 2 plus 2" in p and "<answer>k</answer>" in p
    assert with_icc.replace(facts + "\n", "") == without  # ICC adds one line and changes nothing else
    assert "so far: (nothing yet)" in genac.critic_prompt("q", "  ", None)


@pytest.mark.parametrize("text, want", [
    ("Difficulty: easy. <answer>7</answer>", 0.7),
    ("<answer> 10 </answer>", 1.0),
    ("<answer>15</answer>", 1.0),  # out of range: clamped
    ("<answer>-3</answer>", 0.0),
    ("<answer>4.5</answer>", 0.45),
    ("I think 7", None),  # missing
    ("<answer>seven</answer>", None),
    ("<answer>3</answer> no, <answer>3</answer>", 0.3),  # several that agree count once
    ("<answer>3</answer> or <answer>8</answer>", None),  # several that disagree: hedging is unparsable
    ("<answer>12</answer><answer>10</answer>", 1.0),  # they agree once clamped
])
def test_parse_value(text, want):
    got = genac.parse_value(text)
    assert got == pytest.approx(want) if want is not None else got is None


def test_critic_reward():
    assert genac.critic_reward(1.0, 0.7) == pytest.approx(1 - 0.09)
    assert genac.critic_reward(0.0, 0.7) == pytest.approx(1 - 0.49)
    assert genac.critic_reward(1.0, 1.0) == 1.0 and genac.critic_reward(0.0, 1.0) == 0.0
    assert genac.critic_reward(1.0, None) == 0.0  # malformed: nothing, not even the worst value's 0


def test_sft_trace_parses_to_the_rounded_rate():
    for p in (0.0, 0.25, 0.5, 0.66, 1.0):
        t = genac.sft_trace(p, "")
        assert genac.parse_value(t) == pytest.approx(round(10 * p) / 10)
    assert "hard" in genac.sft_trace(0.1, "") and "easy" in genac.sft_trace(0.9, "")
    assert "boxed answer" in genac.sft_trace(0.5, "so \\boxed{4}") and "nothing" in genac.sft_trace(0.5, "")


# ---------------------------------------------------------------- segments


def test_segment_bounds():
    assert genac.segment_bounds(48, 16) == [0, 16, 32, 47]
    assert genac.segment_bounds(17, 16) == [0, 16]  # the final token's state is already a boundary
    assert genac.segment_bounds(16, 16) == [0, 15]
    assert genac.segment_bounds(5, 16) == [0, 4]
    assert genac.segment_bounds(1, 16) == [0] and genac.segment_bounds(0, 16) == [0]


def test_segment_gae_by_hand():
    # V = [0.5, 0.8, 0.9], r = 1, gamma 1, lambda 0.5: delta = [0.3, 0.1, 0.1]
    # A_2 = 0.1, A_1 = 0.1 + 0.5 * 0.1 = 0.15, A_0 = 0.3 + 0.5 * 0.15 = 0.375
    assert genac.segment_gae([0.5, 0.8, 0.9], 1.0, 1.0, 0.5) == pytest.approx([0.375, 0.15, 0.1])
    # lambda = 1 telescopes: A_k = r - V_k (a Monte-Carlo advantage with the critic as baseline)
    assert genac.segment_gae([0.5, 0.8, 0.9], 1.0, 1.0, 1.0) == pytest.approx([0.5, 0.2, 0.1])
    # lambda = 0: one-step TD errors; gamma discounts per segment
    assert genac.segment_gae([0.5, 0.8], 0.0, 0.5, 0.0) == pytest.approx([0.5 * 0.8 - 0.5, -0.8])
    assert genac.segment_gae([0.25], 1.0) == pytest.approx([0.75])


def test_segment_advantages_spread_over_tokens():
    A = genac.segment_advantages([0, 2, 4], [1.0, 2.0, 3.0], T=5, L=7)
    assert A.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0]  # the last segment is the final token; padding 0


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "genac.py"), *argv], capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def three_stages(module_dir):
    """`python genac.py` (no subcommand) on a tiny budget: sft, pretrain, then 2 joint steps."""
    out = module_dir("genac")
    run(*TINY, "--steps", "2", "--oracle-k", "2", "--out", str(out))
    return out


def test_no_subcommand_runs_the_three_stages(three_stages):
    sft, pre, joint = (rows(p / "metrics.jsonl") for p in (three_stages / "sft", three_stages / "pretrain", three_stages))
    # stage 1: 3 problems' empty states + one state per later boundary of each of the 6 rollouts
    assert sft[0]["sft_rows"] >= 3 + 6 and all(r["sft_loss"] > 0 for r in sft[1:])
    assert len(pre) == 1 and pre[0]["critic_tokens"] > 0 and 0 <= pre[0]["critic_reward"] <= 1
    assert [r["step"] for r in joint] == [0, 1, 2]
    for r in joint[1:]:
        for k in ("critic_mse", "critic_parse_fail", "critic_tokens", "acc", "grad_norm", "baseline_mse", "time_critic"):
            assert r[k] is not None, k
        assert r["critic_queries"] >= 2 and 0 <= r["critic_mse"] <= 1
    assert "eval_acc" in joint[0] and "eval_acc" in joint[-1]
    # each stage hands its critic and the actor's running success rate to the next
    for stage in ("sft", "pretrain"):
        assert (three_stages / stage / "ckpt" / "critic" / "model.safetensors").exists()
    assert (three_stages / "ckpt" / "critic" / "model.safetensors").exists()
    assert joint[1]["icc_ema"] == pytest.approx(pre[0]["icc_ema"] * 0.9 + 0.1 * pre[0]["acc"], abs=1e-6)


def test_stage_3_resume_continues_exactly(three_stages, tmp_path):
    critic = str(three_stages / "pretrain" / "ckpt" / "critic")
    run("train", *TINY, "--critic", critic, "--steps", "1", "--oracle-k", "2", "--save-every", "1", "--out", str(tmp_path))
    run("train", *TINY, "--critic", critic, "--steps", "2", "--oracle-k", "2", "--resume", "--out", str(tmp_path))
    # eval_acc differs by design: the 1-step run evaluated after its last step, the straight run did not at step 1
    volatile = {"time_gen", "time_train", "time_critic", "time_step", "peak_mem_gb", "eval_acc"}
    keys = lambda r: {k: v for k, v in r.items() if k not in volatile}  # noqa: E731
    resumed, straight = rows(tmp_path / "metrics.jsonl"), rows(three_stages / "metrics.jsonl")
    assert [keys(r) for r in resumed] == [keys(r) for r in straight]
    assert resumed[-1]["eval_acc"] == straight[-1]["eval_acc"]
    for part in ("policy", "critic"):
        a, b = (load_file(o / "ckpt" / part / "model.safetensors") for o in (three_stages, tmp_path))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_no_icc_prompts_carry_no_actor_facts(tmp_path):
    """--no-icc reaches the prompts the critic is trained on (stage 1 writes them once: check the tokens)."""
    tok = C.load_model("smollm2-135m")[1]
    args = genac.Args(icc=False)
    states = [genac.State("What is 2 + 2?", "2 plus", 30)]
    without = tok.decode(genac.critic_inputs(tok, states, args, ("smollm2-135m", 135_000_000), 0.4)[0])
    with_icc = tok.decode(genac.critic_inputs(tok, states, genac.Args(), ("smollm2-135m", 135_000_000), 0.4)[0])
    assert "success rate is 40%" in with_icc and "30 tokens left" in with_icc
    assert "success rate" not in without and "tokens left" not in without and "What is 2 + 2?" in without


def test_unknown_command_is_a_clear_error():
    p = run("fit", check=False)
    assert p.returncode != 0 and "unknown command 'fit'" in p.stderr
