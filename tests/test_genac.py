"""genac.py: the critic's prompt with and without ICC, parsing, the critic's reward, segment boundaries and
segment-level GAE by hand, each rollout's values on its own tokens, stage 1's Monte-Carlo rates with a scripted
actor, the critic's REINFORCE step on a tiny model, flag checks, and the three stages end to end with exact
resume."""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common as C
import genac
from conftest import ROOT, run_script, rolled_back

EASY = str(ROOT / "tests" / "data" / "easy_add.jsonl")
TINY = ["--data", EASY, "--max-new-tokens", "12", "--segment", "6", "--critic-max-tokens", "12", "--prompts-per-step",
        "2", "--sft-problems", "3", "--sft-n", "2", "--sft-continuations", "1", "--sft-epochs", "1",
        "--micro-batch-size", "8", "--pretrain-steps", "1", "--eval-problems", "2", "--seed", "1"]


# ---------------------------------------------------------------- the critic's interface


def test_prompt_with_and_without_icc():
    facts = genac.icc_context("smollm2-135m", 134_515_008, 0.345, 20)
    assert facts == ("Infer how capable the actor is from its response so far and these facts. The actor is "
                     "smollm2-135m (135M parameters). Its recent success rate is 34%. It has 20 tokens left.")
    assert "(4.0B parameters)" in genac.icc_context("Qwen3-4B", 4_022_468_096, 0.5, 1)
    with_icc = genac.critic_prompt("What is 2 + 2?", "2 plus 2 ", facts)
    without = genac.critic_prompt("What is 2 + 2?", "2 plus 2 ", None)
    assert facts in with_icc and "actor is" not in without and "success rate is" not in without
    assert "Infer how capable" not in without  # the paper's ICC instruction goes with ICC: --no-icc ablates it
    for p in (with_icc, without):
        assert "Problem: What is 2 + 2?" in p and "so far: 2 plus 2" in p and "<answer>k</answer>" in p
    assert with_icc.replace(facts + "\n", "") == without  # ICC adds one line and changes nothing else
    assert "so far: (nothing yet)" in genac.critic_prompt("q", "  ", None)


@pytest.mark.parametrize("text, want", [
    ("Difficulty: easy. <answer>7</answer>", 0.7),
    ("<answer> 10 </answer>", 1.0),  # whitespace around the integer is fine
    ("<answer>0</answer>", 0.0),
    ("<answer>07</answer>", 0.7),  # a leading zero: still the integer 7
    ("<answer>11</answer>", None),  # outside 0..10: unparsable, not clamped
    ("<answer>15</answer>", None),
    ("<answer>-1</answer>", None),
    ("<answer>4.5</answer>", None),  # the paper's answer is an integer
    ("<answer>10.0</answer>", None),
    ("<answer>+4</answer>", None),
    ("<answer>4 5</answer>", None),
    ("<answer></answer>", None),
    ("I think 7", None),  # missing
    ("<answer>seven</answer>", None),
    ("<answer>3</answer> no, <answer>3</answer>", 0.3),  # several that agree count once
    ("<answer>3</answer> or <answer>8</answer>", None),  # several that disagree: hedging is unparsable
    ("<answer>3</answer> or <answer>3.5</answer>", None),  # one bad tag spoils the answer
    ("<answer>12</answer><answer>10</answer>", None),
    ("<answer>\n4\n</answer>", 0.4),
])
def test_parse_value(text, want):
    got = genac.parse_value(text)
    assert got == pytest.approx(want) if want is not None else got is None


def test_critic_rewards():
    r, v = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor([0.7, 0.7, 1.0, 1.0, 0.4])
    parsed = torch.tensor([True, True, True, True, False])
    R = genac.critic_rewards(r, v, parsed)
    # 1 - 0.3^2, 1 - 0.7^2, exact, worst; the last is malformed: 0, though its fallback 0.4 would earn 0.64
    assert R.tolist() == pytest.approx([1 - 0.09, 1 - 0.49, 1.0, 0.0, 0.0])
    assert R.dtype == torch.float32


def test_sft_trace_parses_to_the_rounded_rate():
    for p in (0.0, 0.25, 0.5, 0.66, 1.0):
        t = genac.sft_trace(p, "")
        assert genac.parse_value(t) == pytest.approx(round(10 * p) / 10)
    assert "hard" in genac.sft_trace(0.1, "") and "easy" in genac.sft_trace(0.9, "")
    assert "moderate" in genac.sft_trace(0.3, "") and "hard" in genac.sft_trace(0.29, "")
    assert "easy" in genac.sft_trace(0.7, "") and "moderate" in genac.sft_trace(0.69, "")
    assert "boxed answer" in genac.sft_trace(0.5, "so \\boxed{4}") and "nothing" in genac.sft_trace(0.5, "")
    assert "work has started" in genac.sft_trace(0.5, "2 plus")


def test_args_reject_values_that_make_no_sense():
    for kw, flag in [({"segment": 0}, "--segment"), ({"icc_ema": 1.5}, "--icc-ema"), ({"lam": -0.1}, "--lam"),
                     ({"critic_batch": -1}, "--critic-batch"), ({"critic_temperature": 0.0}, "--critic-temperature"),
                     ({"sft_n": 0}, "--sft-n"), ({"group_size": 0}, "--group-size")]:
        with pytest.raises(ValueError, match=flag):
            genac.Args(**kw)
    genac.Args(icc_ema=0.0, lam=1.0, critic_batch=0, sft_continuations=0)  # the edges are fine


# ---------------------------------------------------------------- segments


def test_segment_bounds():
    assert genac.segment_bounds(48, 16) == [0, 16, 32, 47]
    assert genac.segment_bounds(48, 24) == [0, 24, 47]  # the default: three queries a 48-token rollout
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
    # gamma and lambda together: delta = [0.5 * 0.8 - 0.5, 1 - 0.8] = [-0.1, 0.2], A_0 = -0.1 + 0.5 * 0.5 * 0.2
    assert genac.segment_gae([0.5, 0.8], 1.0, 0.5, 0.5) == pytest.approx([-0.05, 0.2])
    assert genac.segment_gae([0.25], 1.0) == pytest.approx([0.75])


def test_segment_advantages_spread_over_tokens():
    A = genac.segment_advantages([0, 2, 4], [1.0, 2.0, 3.0], T=5, L=7)
    assert A.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0]  # the last segment is the final token; padding 0


def test_each_rollout_gets_its_own_values_and_outcome():
    """The joint step's indexing: the flat critic values (states_of's order) land on their own rollout's tokens."""
    bounds, lengths = [[0, 2, 4], [0, 2]], [5, 3]
    v = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.9])  # rollout 0: V = 0.1, 0.2, 0.3; rollout 1: V = 0.7, 0.9
    assert genac.per_rollout(v, bounds) == [pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.7, 0.9])]
    A = genac.rollout_advantages(v, bounds, [1.0, 0.0], lengths, L=6, gamma=1.0, lam=1.0)  # lambda 1: A_k = r - V_k
    torch.testing.assert_close(A, torch.tensor([[0.9, 0.9, 0.8, 0.8, 0.7, 0.0], [-0.7, -0.7, -0.9, 0.0, 0.0, 0.0]]))
    with pytest.raises(RuntimeError):  # a value per boundary state, no more, no fewer
        genac.per_rollout(v[:4], bounds)


def test_states_of_cuts_each_rollout_at_its_boundaries(tiny_tok):
    probs = [C.Problem("a", "q0", "1"), C.Problem("b", "q1", "2")]
    roll = [C.Rollout(1, [9], [5, 6, 7, 8, 1], "", [0.0] * 5, "stop"),
            C.Rollout(0, [9], [3, 4], "", [0.0] * 2, "length")]
    states, bounds = genac.states_of(tiny_tok, probs, roll, [1.0, 0.0], genac.Args(segment=2, max_new_tokens=6))
    assert bounds == [[0, 2, 4], [0, 1]]
    assert [(s.question, s.partial, s.left, s.outcome) for s in states] == [
        ("q1", "", 6, 1.0), ("q1", "5 6", 4, 1.0), ("q1", "5 6 7 8", 2, 1.0), ("q0", "", 6, 0.0), ("q0", "3", 5, 0.0)]


class WordTok:
    """Token ids as words: 5 'so', 6 '\\boxed{4}', 7 '\\boxed{5}'; 1 is eos."""
    chat_template, pad_token_id = None, 0
    WORDS = {5: "so", 6: "\\boxed{4}", 7: "\\boxed{5}"}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[i] for i in ids if i != 1)


class ScriptedSampler:
    """Answers each prompt with the responses in `script` (keyed by a question's text or by a prefix's ids), cut at
    max_new_tokens like a real sampler; records each call's (n, max_new_tokens)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, seed=0, min_new_tokens=0, desc=None):
        self.calls.append((n, max_new_tokens))
        out = []
        for i, p in enumerate(prompts):
            key = tuple(p) if isinstance(p, list) else next(q for q in self.script if isinstance(q, str) and q in p)
            pids = list(p) if isinstance(p, list) else [100 + len(key)]
            assert len(self.script[key]) == n
            out += [C.Rollout(i, pids, ids[:max_new_tokens], WordTok().decode(ids[:max_new_tokens]), [0.0], "stop")
                    for ids in self.script[key]]
        return out


def test_monte_carlo_states_by_hand():
    """Stage 1's p_MC, with a scripted actor (answer 4; segment 2, budget 6, 2 rollouts a problem, 2 continuations)."""
    probs = [C.Problem("a", "qa", "4"), C.Problem("b", "qbb", "4")]  # prompt ids [102] and [103]
    script = {
        "qa": [[5, 5, 5, 6, 1], [5, 7, 1]],  # right (T 5: states 0, 2 mid, 4 final); wrong (T 3: 0, 2 final)
        "qbb": [[5, 5, 5, 5, 1], [6, 1]],  # no answer (0, 2 mid, 4 final); right (T 2: 0, 1 final)
        (102, 5, 5): [[6, 1], [7, 1]],  # from qa's first rollout at t = 2: one right, one wrong
        (103, 5, 5): [[6, 1], [5, 5, 5, 5, 6]],  # the second is right only past the state's budget of 4 tokens
    }
    sampler = ScriptedSampler(script)
    args = genac.Args(sft_n=2, sft_continuations=2, segment=2, max_new_tokens=6)
    states, p_mc, acc, n_cont = genac.monte_carlo_states(sampler, WordTok(), probs, args)
    assert sampler.calls == [(2, 6), (2, 5)]  # continuations may run to the largest budget left, 6 - 1
    assert acc == 0.5 and n_cont == 2 * 2  # 2 mid states x --sft-continuations
    # empty states: the mean of the 2 rollouts; mid states: (rollout + continuations) / 3; final: the rollout
    assert p_mc.tolist() == pytest.approx([1 / 2, 1 / 2, (1 + 1 + 0) / 3, (0 + 1 + 0) / 3, 1, 0, 0, 1])
    assert [(s.question, s.partial, s.left) for s in states] == [
        ("qa", "", 6), ("qbb", "", 6), ("qa", "so so", 4), ("qbb", "so so", 4),
        ("qa", "so so so \\boxed{4}", 2), ("qa", "so \\boxed{5}", 4), ("qbb", "so so so so", 2),
        ("qbb", "\\boxed{4}", 5)]


class CharTok:
    """Text as character codes, enough for critic_inputs (no chat template)."""
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_query_critic_parses_each_answer_and_falls_back_to_the_running_mean():
    class Critic:
        def generate(self, prompts, n, max_new_tokens, temperature=1.0, seed=0, min_new_tokens=0, desc=None):
            self.seen = (["".join(map(chr, p)) for p in prompts], n, max_new_tokens, temperature)
            return [C.Rollout(i, p, [1], text, [0.0], "stop") for i, (p, text) in
                    enumerate(zip(prompts, ["<answer>8</answer>", "no idea", "<answer>2</answer>"]))]
    critic, args = Critic(), genac.Args(critic_max_tokens=9, critic_temperature=0.5)
    states = [genac.State("q0", "", 48), genac.State("q0", "so far", 24), genac.State("q1", "x", 47)]
    v, ok, roll = genac.query_critic(critic, CharTok(), states, args, ("tiny", 5_000_000), 0.35, seed=3)
    assert v.tolist() == pytest.approx([0.8, 0.35, 0.2]) and ok.tolist() == [True, False, True]
    prompts, n, max_new, temp = critic.seen
    assert (n, max_new, temp) == (1, 9, 0.5)  # one sample per state, at the critic's own limit and temperature
    assert "success rate is 35%" in prompts[1] and "24 tokens left" in prompts[1] and "so far: so far" in prompts[1]
    assert "Problem: q1" in prompts[2] and "47 tokens left" in prompts[2]


def test_critic_update_runs_one_plain_reinforce_pass_at_the_critic_temperature(monkeypatch):
    seen = {}
    monkeypatch.setattr(C, "policy_update", lambda model, opt, batch, adv, a: seen.update(adv=adv, a=a) or
                        {"grad_norm": 1.0, "nan_skips": 0})
    roll = [C.Rollout(0, [3], [10, 11, 1], "", [0.0] * 3, "stop"), C.Rollout(0, [3], [20, 1], "", [0.0] * 2, "stop")]
    args = genac.Args(critic_batch=0, critic_temperature=0.5, critic_max_tokens=9, epochs=4, minibatch_size=1,
                      kl_coef=0.1, loss_agg="seq-mean-token-mean")
    genac.critic_update(None, None, roll, torch.tensor([1.0, 0.5]), args, 0, "cpu", seed=0)
    a = seen["a"]
    assert (a.temperature, a.max_new_tokens, a.epochs, a.minibatch_size, a.kl_coef, a.loss_agg) == \
        (0.5, 9, 1, 0, 0.0, "token-mean")
    # (R_v - mean R_v) on each answer's own tokens, 0 on its padding (rows in keep's random order: sort them)
    adv = seen["adv"][seen["adv"][:, 0].argsort()]
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -0.25, 0.0], [0.25, 0.25, 0.25]]))


def test_critic_update_raises_the_better_answer(tiny_lm):
    """One REINFORCE step: the answer with the higher R_v gains log-probability, the lower one loses it; equal
    rewards move nothing (the baseline is their mean); the baseline is the mean over all answers, not the kept."""
    prompt = [3, 4, 5]

    def answer(ids):
        return C.Rollout(0, prompt, ids, "", [0.0] * len(ids), "stop")
    a, b = answer([10, 11, 12, 1]), answer([20, 21, 1])
    args = genac.Args(critic_batch=0, critic_temperature=1.0, logp_chunk=0)

    def logp(model, rolls):
        batch = C.collate(rolls, 0)
        with torch.no_grad():
            lp = C.forward_logprobs(model, batch, 1.0, 0)["logp"]
        return (lp * batch["response_mask"]).sum(-1)

    def step(rewards, rolls, **kw):
        model = copy.deepcopy(tiny_lm)
        before = logp(model, rolls)
        genac.critic_update(model, torch.optim.SGD(model.parameters(), lr=0.5), rolls, torch.tensor(rewards),
                            dataclasses.replace(args, **kw), 0, "cpu", seed=0)
        return logp(model, rolls) - before

    up_a = step([0.9, 0.1], [a, b])
    assert up_a[0] > 0 and up_a[1] < 0
    up_b = step([0.1, 0.9], [a, b])
    assert up_b[0] < 0 and up_b[1] > 0
    assert step([0.6, 0.6], [a, b]).abs().max() == 0  # R_v - mean R_v = 0: no gradient
    # critic_batch 1 trains on one answer of four, with reward 0 where another has 1: its advantage is 0 - 1/4
    # (the baseline over all four), not the 0 a baseline over the kept answer alone would give
    rolls = [a, b, answer([30, 1]), answer([40, 1])]
    keep = torch.randperm(4, generator=torch.Generator().manual_seed(0))[0].item()
    rewards = [0.0] * 4
    rewards[(keep + 1) % 4] = 1.0
    assert step(rewards, rolls, critic_batch=1)[keep] < 0


# ---------------------------------------------------------------- end to end


def run(*argv, check=True):
    return run_script("genac.py", *argv, check=check)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def three_stages(module_dir):
    """`python genac.py` (no subcommand) on a tiny budget: sft, pretrain, then 2 joint steps."""
    out = module_dir("genac")
    run(*TINY, "--steps", "2", "--oracle-k", "2", "--save-every", "1", "--keep-checkpoints", "2", "--out", str(out))
    return out


@pytest.mark.slow
def test_no_subcommand_runs_the_three_stages(three_stages):
    sft, pre, joint = (rows(p / "metrics.jsonl") for p in (three_stages / "sft", three_stages / "pretrain", three_stages))
    # stage 1: 3 problems' empty states + at least one later state of each of the 6 rollouts; one epoch of
    # micro-batches of 8 traces
    assert sft[0]["sft_rows"] >= 3 + 6 and len(sft) - 1 == -(-sft[0]["sft_rows"] // 8)
    assert sft[0]["sft_continuations"] == (sft[0]["sft_rows"] - 3 - 6) * 1  # a mid state each, x --sft-continuations
    assert len(pre) == 1 and pre[0]["critic_tokens"] > 0
    assert [r["step"] for r in joint] == [0, 1, 2]
    for r in [*pre, *joint[1:]]:
        # mean R_v = 1 - MSE exactly when every answer parsed; an unparsable one earns 0 where its fallback's
        # squared error would have left it 1 - (r - ema)^2 > 0
        if r["critic_parse_fail"] == 0:
            assert r["critic_reward"] == pytest.approx(1 - r["critic_mse"], abs=1e-6)
        else:
            assert r["critic_reward"] < 1 - r["critic_mse"]
    for r in joint[1:]:
        for k in ("critic_parse_fail", "critic_tokens", "critic_queries", "grad_norm", "baseline_mse", "time_critic"):
            assert r[k] is not None, k
    assert "eval_acc" in joint[0] and "eval_acc" in joint[-1]
    # each stage hands its critic and the actor's running success rate to the next
    for stage in ("sft", "pretrain"):
        assert (three_stages / stage / "ckpt" / "critic" / "model.safetensors").exists()
    assert (three_stages / "ckpt" / "critic" / "model.safetensors").exists()
    assert pre[0]["icc_ema"] == pytest.approx(sft[0]["actor_acc"], abs=1e-6)  # stage 1's rollouts' success rate
    assert joint[1]["icc_ema"] == pytest.approx(pre[0]["icc_ema"] * 0.9 + 0.1 * pre[0]["acc"], abs=1e-6)
    assert joint[2]["icc_ema"] == pytest.approx(joint[1]["icc_ema"] * 0.9 + 0.1 * joint[1]["acc"], abs=1e-6)


@pytest.mark.slow
def test_resume_skips_the_finished_stages_and_continues_stage_3_exactly(three_stages, tmp_path):
    """The three-stage run as a crash right after stage 3's step 1 leaves it, resumed with no subcommand: stages 1
    and 2 do not run again, and stage 3 ends with the metrics and both models of the run in one go."""
    cut = rolled_back(three_stages, 1, tmp_path / "cut")
    logs = {stage: (cut / stage / "metrics.jsonl").read_text() for stage in ("sft", "pretrain")}
    p = run(*TINY, "--steps", "2", "--oracle-k", "2", "--resume", "--out", str(cut))
    assert "genac sft" not in p.stderr and "genac pretrain" not in p.stderr  # their progress bars
    assert {stage: (cut / stage / "metrics.jsonl").read_text() for stage in logs} == logs
    volatile = {"time_gen", "time_train", "time_critic", "time_step", "peak_mem_gb"}
    keys = lambda r: {k: v for k, v in r.items() if k not in volatile}  # noqa: E731
    assert [keys(r) for r in rows(cut / "metrics.jsonl")] == [keys(r) for r in rows(three_stages / "metrics.jsonl")]
    for part in ("policy", "critic"):
        a, b = (load_file(o / "ckpt" / part / "model.safetensors") for o in (three_stages, cut))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_resume_redoes_only_the_stages_cut_short_and_names_a_changed_flag(tmp_path, monkeypatch):
    """run_all's dispatch, the stages stubbed: stage 1 finished (its critic is there), stage 2 and 3 were cut short
    before their checkpoints, so --resume starts stage 2 afresh from stage 1's critic, then stage 3 afresh."""
    calls = []

    def stub(name):
        def stage(a):
            calls.append((name, a.resume, a.overwrite, a.critic))
            return Path(a.out) / "ckpt" / "critic"
        return stage
    for name in ("sft", "pretrain", "train"):
        monkeypatch.setattr(genac, name, stub(name))
    out = tmp_path / "run"
    C.start_run(genac.Args(out=str(out / "sft")), "genac sft")
    (out / "sft" / "ckpt" / "critic").mkdir(parents=True)
    genac.run_all(genac.Args(out=str(out), resume=True))
    first, second = str(out / "sft" / "ckpt" / "critic"), str(out / "pretrain" / "ckpt" / "critic")
    assert calls == [("pretrain", False, True, first), ("train", False, True, second)]
    with pytest.raises(SystemExit, match="--sft-n 4 \\(saved\\) -> 3 \\(now\\)"):
        genac.run_all(genac.Args(out=str(out), resume=True, sft_n=3))


@pytest.mark.slow
def test_no_icc_prompts_carry_no_actor_facts(tmp_path):
    """--no-icc reaches the prompts the critic is trained on (stage 1 writes them once: check the tokens)."""
    tok = C.load_model("smollm2-135m")[1]
    args = genac.Args(icc=False)
    states = [genac.State("What is 2 + 2?", "2 plus", 30)]
    without = tok.decode(genac.critic_inputs(tok, states, args, ("smollm2-135m", 135_000_000), 0.4)[0])
    with_icc = tok.decode(genac.critic_inputs(tok, states, genac.Args(), ("smollm2-135m", 135_000_000), 0.4)[0])
    assert "success rate is 40%" in with_icc and "30 tokens left" in with_icc and "Infer how capable" in with_icc
    assert "success rate" not in without and "tokens left" not in without and "What is 2 + 2?" in without
    assert "Infer how capable" not in without


@pytest.mark.slow
def test_unknown_command_and_bad_flags_are_clear_errors():
    p = run("fit", check=False)
    assert p.returncode != 0 and "unknown command 'fit'" in p.stderr
    p = run("train", "--segment", "0", check=False)
    assert p.returncode == 2 and "--segment must be >= 1, got 0" in p.stderr


def test_icc_ablation_summarises_the_seeds_it_finds_with_t_intervals(tmp_path):
    """benchmarks/genac_icc.py: the seed files already there are read, not re-run (nothing here loads a model); the
    summary is each MSE's mean with Student's t interval (t_{0.975, 2} = 4.303) and the paired differences."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import genac_icc as bench
    settings = {"heldout": 48, "oracle_k": 12, "critic_samples": 4, "eval_data": "arith:test", "extra": []}
    icc, no_icc, const = [0.03, 0.04, 0.05], [0.05, 0.05, 0.05], [0.06, 0.06, 0.06]
    for seed in range(3):
        res = {"icc": {"mse": icc[seed]}, "no_icc": {"mse": no_icc[seed]}, "constant_mse": const[seed]}
        (tmp_path / f"seed{seed}.json").write_text(json.dumps({"settings": settings, **res}))
    with pytest.raises(SystemExit, match=r"--heldout 48 \(saved\) -> 32 \(now\)"):
        bench.main(["--heldout", "32", "--out", str(tmp_path)])  # a seed measured otherwise is not mixed in
    summary = bench.main(["--out", str(tmp_path)])
    m, lo, hi = summary["icc"]
    assert m == pytest.approx(0.04) and hi - m == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-3)
    assert summary["icc - no_icc"] == pytest.approx([-0.01, lo - 0.05, hi - 0.05])
    assert summary["icc - constant"][0] == pytest.approx(-0.02) and summary["constant"] == pytest.approx([0.06] * 3)
    assert json.loads((tmp_path / "summary.json").read_text())["no_icc"][0] == pytest.approx(0.05)
