"""Shared plumbing for every method file: the CLI, rewards, log-probs, the loss and the update, evaluation.

Nothing here is specific to one method. A method file imports what it needs and keeps its own
baseline / critic / advantage math in its own small functions (PPO's token rewards, GAE and
value model are in ppo.py, which dvpo.py and genac.py import). This file reads as one training step,
top to bottom; the subsystems around it sit in plumbing/ and are re-exported here (C.load_model ...):

  CLI .............. TrainArgs (the flags every training script shares), parse_args
  plumbing/models .. load_model (embedded smollm2-135m, a local folder, a hub id or alias), pick_device
  plumbing/data .... load_problems (arith generator, .jsonl files, hub datasets), ProblemStream, parse_gold
  prompts .......... build_prompt (the chat template and the \\boxed{} instruction)
  plumbing/sampling  HFSampler / VLLMSampler: generate(prompts, n) with per-prompt n, sync_weights; memory_plan
  rewards .......... score (math-verify, fail closed, safe off the main thread)
  batches .......... collate: left-padded prompts, right-padded responses, masks
  log-probs ........ forward_logprobs: chunked so [B, T, vocab] logits never exist at once; a group's shared
                     prompt runs once (shared_prompt_states)
  losses ........... policy_loss (clip / clip-higher / dual-clip, 3 aggregation modes, KL k1/k2/k3)
  advantages ....... masked_mean, masked_whiten
  updates .......... minibatch_update (epochs, mini/micro-batches, NaN-safe step), policy_update
  evaluation ....... evaluate, oracle_baseline_mse, batch_metrics
  plumbing/runs .... RunLogger (metrics.jsonl + console), start_run (settings, --resume), checkpoints (atomic)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import resource
import sys
import threading
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

# The subsystems live beside this file in plumbing/ and are re-exported, so C.load_model, C.load_problems,
# C.HFSampler, C.start_run and the rest name them here as before. noqa: names for the method files, not this one.
from plumbing.models import (EMBEDDED, MODEL_ALIASES, TextEncoder, cache_dir, embedded_model_folder,  # noqa: F401
                             eos_ids, load_model, minilm_folder, pick_device, resolve_model)
from plumbing.data import (ARITH_LEVELS, SPLITS, Problem, ProblemStream, _mv_parse, arith_problems,  # noqa: F401
                           hub_problems, hub_spec, load_problems, normalize_row, parse_gold, read_json, read_jsonl,
                           shuffled_batch, split_by_key, with_gold)
from plumbing.sampling import (HFSampler, Rollout, VLLMSampler, _prompt_ids, activation_bytes,  # noqa: F401
                               format_plan, gpu_bf16, kv_bytes_per_token, make_sampler, memory_plan, n_params,
                               opens_think)
from plumbing.runs import (METRICS, OPERATIONAL, RunLogger, Timer, atomic_file, finished_stage, flag,  # noqa: F401
                           git_commit, keep_steps, load_checkpoint, pearson, read_state, roc_auc, save_checkpoint,
                           start_run, tracker, write_jsonl)

# -------------------- CLI ------------------------------------------------------------------------


def arg(default, help: str, **kw):
    """A dataclass field whose help text shows up in --help. kw may hold `choices`."""
    return field(default=default, metadata={"help": help, **kw})


# --preset: the values of every TrainArgs field that defaults to None. A method's Args extends them (presets()).
CPU = dict(model="smollm2-135m", data="arith", steps=20, prompts_per_step=8, max_new_tokens=48, temperature=0.7,
           lr=3e-5, eval_data="arith:test", eval_problems=64, eval_n=1, micro_batch_size=16, minibatch_size=0, save_every=5,
           grad_checkpointing=False)
# The papers' scale on one 80 GB GPU (docs/gpu.md): Qwen3-4B-Instruct-2507 on DAPO-Math-17k, temperature 1,
# lr 1e-6, mean@16 on MATH-500 (ours: one of the papers' six benchmarks, shipped in data/eval).
PAPER = dict(model="Qwen3-4B", data="BytedTsinghua-SIA/DAPO-Math-17k", steps=200, prompts_per_step=64,
             max_new_tokens=8192, temperature=1.0, lr=1e-6, eval_data="data/eval/math500.jsonl", eval_problems=500,
             eval_n=16, micro_batch_size=2, minibatch_size=0, save_every=10,
             grad_checkpointing=True)


def presets(cpu: dict | None = None, paper: dict | None = None) -> dict:
    """A method's --preset table: the shared CPU and PAPER values, updated with the method's own."""
    return {"cpu": {**CPU, **(cpu or {})}, "paper": {**PAPER, **(paper or {})}}


@dataclass
class TrainArgs:
    """Flags every training script shares. A method's Args subclasses this and adds its own.
    PRESETS: {selecting field: {its value: {field: value}}}, e.g. {"variant": {"dapo": {"eps_high": 0.28}}}.
    A field a preset sets defaults to None and takes the chosen preset's value in __post_init__, so
    Args(variant="dapo") in Python and `--variant dapo` on the command line give the same run, and a value
    given explicitly (keyword or flag) always wins. A subclass with checks of its own calls
    super().__post_init__() first, then raises ValueError naming the flag."""
    PRESETS: ClassVar[dict] = {"preset": {"cpu": CPU, "paper": PAPER}}
    preset: str = arg("auto", "cpu: minutes on 2 CPU cores (smollm2-135m on arith); paper: the paper's settings "
                      "sized to one 80 GB GPU (docs/gpu.md); auto: paper on a GPU, cpu elsewhere",
                      choices=["auto", "cpu", "paper"])
    model: str | None = arg(None, "policy: 'smollm2-135m' (embedded, offline), a local HF folder, a hub id, "
                            "or an alias such as Qwen3-4B (see common.MODEL_ALIASES); default: set by --preset")
    data: str | None = arg(None, "training problems: 'arith' (built-in generator), a .jsonl file, or a hub dataset "
                           "'org/name[:config][:split]'; default: set by --preset")
    steps: int | None = arg(None, "policy updates, each on a fresh batch of rollouts (default: set by --preset)")
    prompts_per_step: int | None = arg(None, "prompts per step (default: set by --preset)")
    max_new_tokens: int | None = arg(None, "response length limit in tokens (default: set by --preset)")
    temperature: float | None = arg(None, "sampling temperature of training rollouts, top_p 1, top_k off (default: "
                                    "set by --preset)")
    lr: float | None = arg(None, "AdamW learning rate (default: set by --preset)")
    seed: int = arg(0, "seed for data order, sampling and init; same seed, same CPU, same numbers")
    out: str = arg("runs/default", "run folder: metrics.jsonl, checkpoints (each method defaults to runs/<method>)")
    sampler: str = arg("auto", "rollout backend: vllm on a GPU when installed, else transformers; vllm-bf16: "
                       "vLLM with bfloat16 weights while training stays in --dtype (faster sampling; its "
                       "log-probs differ a little from the float32 trainer's)", choices=["auto", "hf", "vllm", "vllm-bf16"])
    save_every: int | None = arg(None, "checkpoint every N steps and after the last (0: only after the last; "
                                 "default: set by --preset)")
    keep_checkpoints: int = arg(1, "checkpoints kept: OUT/ckpt, the latest, and the N-1 before it as OUT/ckpt-<step>")
    resume: bool = arg(False, "continue from the checkpoint in --out (weights, optimizer, step, RNG); refused when "
                       "OUT/config.json holds other settings that change the run (see --allow-changed)")
    allow_changed: bool = arg(False, "--resume although settings that change the run differ from OUT/config.json")
    overwrite: bool = arg(False, "start afresh in an --out that holds a run: its metrics and checkpoints are deleted")
    report_to: str = arg("none", "also log each step to tensorboard (OUT/tensorboard) or wandb; metrics.jsonl stays "
                         "the record", choices=["none", "tensorboard", "wandb"])
    eval_every: int = arg(0, "evaluate every N steps (0: only before the first and after the last step)")
    eval_data: str | None = arg(None, "evaluation problems, same forms as --data (default: set by --preset)")
    eval_problems: int | None = arg(None, "how many evaluation problems, 0: no evaluation (default: set by --preset)")
    eval_n: int | None = arg(None, "samples per evaluation problem: 1 greedy (accuracy), n > 1 mean@n at "
                             "--temperature (default: set by --preset)")
    oracle_k: int = arg(0, "extra rollouts per prompt, kept out of training, to estimate the true success "
                        "rate and log baseline_mse (0: off)")
    epochs: int = arg(1, "passes over each batch of rollouts (mu in the GRPO paper)")
    minibatch_size: int | None = arg(None, "rollouts per optimizer step, 0: the whole batch, one step per epoch "
                                     "(default: set by --preset)")
    micro_batch_size: int | None = arg(None, "rollouts per forward/backward: gradient accumulation, memory only "
                                       "(default: set by --preset)")
    eps_low: float = arg(0.2, "PPO clip: ratio lower bound 1 - eps_low")
    eps_high: float = arg(0.2, "PPO clip: ratio upper bound 1 + eps_high (DAPO clip-higher: 0.28)")
    dual_clip: float = arg(0.0, "dual-clip constant c for negative advantages (0: off; usually 3)")
    loss_agg: str = arg("token-mean", "loss aggregation over tokens",
                        choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    kl_coef: float = arg(0.0, "beta: weight of the KL penalty to the frozen initial policy (0: off)")
    kl_type: str = arg("k3", "KL estimator", choices=["k1", "k2", "k3"])
    max_grad_norm: float = arg(1.0, "gradient clipping")
    device: str = arg("auto", "cpu, cuda, or auto")
    dtype: str = arg("auto", "dtype of the trained weights, which the optimizer updates in place; auto: float32 "
                     "(master weights; on a GPU the update's matmuls run in bf16, see --autocast); bfloat16 rounds "
                     "away updates smaller than its spacing", choices=["auto", "float32", "bfloat16", "float16"])
    thinking: str = arg("auto", "the chat template's thinking switch (enable_thinking): on, off, or auto (the "
                        "template's own default); scoring reads only what follows the last </think>",
                        choices=["auto", "on", "off"])
    vllm_memory: float = arg(0.0, "share of the GPU's memory the vLLM engine takes for its weights and KV cache (CPU: "
                             "share of RAM for its KV cache); 0: 0.3 on a GPU, 0.1 on CPU")
    max_model_len: int = arg(0, "vLLM's longest sequence in tokens; 0: the longest prompt plus --max-new-tokens")
    vllm_sleep: bool = arg(True, "GPU: free the vLLM engine's memory during each update (sleep mode), woken for "
                           "sampling")
    share_prompts: bool = arg(True, "run a group's shared prompt through the decoder once in the update "
                              "(common.shared_prompt_states): fewer training tokens, the same log-probs and gradients up "
                              "to float rounding, deterministic (--resume exact); off under --grad-checkpointing")
    logp_chunk: int = arg(1024, "tokens per chunk of the lm-head/log-softmax (memory vs speed); 0: all at once "
                          "and no recompute in backward (fastest; the [tokens, vocab] logits are kept)")
    grad_checkpointing: bool | None = arg(None, "recompute each decoder layer's activations in backward instead of "
                                          "storing them: less memory, more compute (default: set by --preset)")
    autocast: str = arg("auto", "updates' forward/backward under torch.autocast: bf16 (mixed precision: float32 "
                        "weights and optimizer, bf16 matmuls; log-probs less exact than float32's), off, or auto "
                        "(bf16 on a GPU, off on CPU)", choices=["auto", "off", "bf16"])

    def __post_init__(self):
        if self.preset == "auto":
            self.preset = "paper" if torch.cuda.is_available() else "cpu"
        for selector, table in {**self.PRESETS, "preset": self.PRESETS.get("preset", presets())}.items():
            chosen = getattr(self, selector)
            if chosen not in table:
                raise ValueError(f"--{flag(selector)} must be one of {', '.join(table)}, got {chosen!r}")
            for name, value in table[chosen].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        unset = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]
        if unset:
            raise ValueError(f"no value for --{', --'.join(map(flag, unset))}: give it, or a preset that sets it")
        if self.dual_clip != 0 and self.dual_clip <= 1:
            raise ValueError(f"--dual-clip must be 0 (off) or > 1 (it bounds -A * ratio at -A * c), got {self.dual_clip}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"--eps-low must be in [0, 1) (the ratio's lower bound 1 - eps_low > 0), got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"--eps-high must be >= 0, got {self.eps_high}")


def parse_args(cls, argv=None):
    """Turn an Args dataclass into an argparse CLI: field `foo_bar` becomes `--foo-bar`. A field whose default
    is None is set by a preset (see TrainArgs). Invalid values exit with argparse's usage error."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        name, help_, choices = "--" + flag(f.name), f.metadata.get("help", ""), f.metadata.get("choices")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = kind.split("|")[0].strip()  # "float | None": a field a preset sets
        if kind == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            typ = {"int": int, "float": float}.get(kind, str)
            p.add_argument(name, type=typ, default=f.default, choices=choices, help=help_)
    try:
        return cls(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def check_ranges(args, **bounds):
    """ValueError naming the flag of the first field outside its closed range, name=(low, high); high None: no bound."""
    for name, (low, high) in bounds.items():
        v = getattr(args, name)
        if not (low <= v and (high is None or v <= high)):  # NaN fails both comparisons: rejected too
            raise ValueError(f"--{flag(name)} must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}, "
                             f"got {v}")


def run_command(commands: dict, default, cls, argv=None):
    """`python script.py [command] [flags]`: the named command (commands: name -> fn(args), or (fn, its own flags'
    class)), or `default` with no command, called with the flags parsed from the rest of argv (cls by default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and not argv[0].startswith("-") else None
    if name is not None and name not in commands:
        script = Path(sys.argv[0]).name
        raise SystemExit(f"python {script} [{'|'.join(commands)}] [flags]: unknown command {name!r}")
    fn = commands.get(name, default)
    fn, cls = fn if isinstance(fn, tuple) else (fn, cls)
    return fn(parse_args(cls, argv[1:] if name else argv))


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rollout_seed(seed: int, step: int, salt: int = 0) -> int:
    """The sampler's seed for a step's training rollouts (salt: a resample, or another stage's draw): the same
    for the same run seed and step, so a --resume'd run samples what the uninterrupted one did."""
    return seed * 1_000_003 + step * 101 + salt


def second_seed(seed: int, step: int) -> int:
    """The seed of a step's second sampling stream (oracle rollouts, a critic's answers), apart from rollout_seed."""
    return seed * 7_919 + step


INSTRUCTION = "Put the final answer in \\boxed{}."


def chat_prompt(tok, content: str) -> str:
    """One user message in the tokenizer's chat template (plain 'Question: ... Answer:' when it has none)."""
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True,
                                       **getattr(tok, "chat_kwargs", {}))
    return f"Question: {content}\nAnswer:"


def build_prompt(tok, problem: Problem) -> str:
    """The policy's prompt: the problem and the instruction to box the final answer, in the chat template."""
    return chat_prompt(tok, f"{problem.question}\n{INSTRUCTION}")


def sampler_for(args, model, tok, path: str, dtype, problems: list[Problem], seed: int | None = None,
                others: dict | None = None, engines: int = 1):
    """A training run's sampler from its flags. vLLM's max_model_len defaults to the longest prompt of `problems`
    plus --max-new-tokens. On a GPU the run's memory plan is printed first (others: see memory_plan)."""
    max_len = args.max_model_len
    if not max_len and (args.sampler != "hf" or torch.cuda.is_available()):
        max_len = max((len(_prompt_ids(tok, build_prompt(tok, p))) for p in problems), default=0) + args.max_new_tokens
    if torch.cuda.is_available():
        print(format_plan(memory_plan(model.config, max_len, args, others, engines)))
    return make_sampler(args.sampler, model, tok, path, dtype, args.seed if seed is None else seed,
                        args.vllm_memory, max_len, args.vllm_sleep)

# -------------------- Rewards --------------------------------------------------------------------

def score(texts: list[str], answers: list[str]) -> tuple[list[float], int]:
    """Verifiable reward r in {0, 1} per completion, and how many had no extractable answer.

    math-verify extracts the answer (\\boxed{} first, then the last LaTeX / plain expression) and checks
    it against the gold answer (verify(gold, pred) is asymmetric: gold first). Several different boxes
    are read as one set ({3, 7}), so hedging earns nothing. Fail closed: no answer,
    a parser error, or a timeout gives 0. Its timeouts use signal.alarm, which works only on the main
    thread; elsewhere we pass no timeout and cap the input length instead (MAX_SCORED_CHARS).
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException  # derives from BaseException: name it explicitly
    on_main = threading.current_thread() is threading.main_thread()
    rewards, no_answer, golds = [], 0, {}
    for text, ans in zip(texts, answers):
        try:
            if ans not in golds:
                golds[ans] = parse_gold(ans, on_main)
            pred = _mv_parse(text, on_main)
            if not pred:
                no_answer += 1
                rewards.append(0.0)
                continue
            ok = verify(golds[ans], pred, timeout_seconds=5 if on_main else None)
        except (Exception, TimeoutException):
            ok = False
        rewards.append(float(ok))
    return rewards, no_answer


def final_answer(text: str, opened: bool = False) -> str:
    """What scoring reads: the text after the last </think>. A reasoning block that was opened (by the response, or
    by a prompt that ends inside one: opened) and never closed gives '': a response cut off mid-thought earns 0."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return "" if opened or "<think>" in text else text


def score_rollouts(rollouts: list[Rollout], problems: list[Problem]) -> tuple[list[float], int]:
    """score() of each rollout's final answer against its problem's gold answer."""
    return score([final_answer(r.text, r.opened) for r in rollouts], [problems[r.prompt_idx].answer for r in rollouts])


def rollouts_scored(sampler, tok, problems: list[Problem], n: int, args, seed: int, desc: str | None = None):
    """n rollouts of each problem (--max-new-tokens, --temperature), verified: (rollouts, correct [B], no_answer)."""
    rollouts = sampler.generate([build_prompt(tok, p) for p in problems], n, args.max_new_tokens, args.temperature,
                                seed=seed, desc=desc)
    correct, no_answer = score_rollouts(rollouts, problems)
    return rollouts, correct, no_answer


# -------------------- Batches and log-probs ------------------------------------------------------


def collate(rollouts: list[Rollout], pad_id: int, device="cpu") -> dict:
    """Pack rollouts as [left-padded prompt | right-padded response] so every response starts at column P.
    input_ids, attention_mask, position_ids: [B, P+L]; response_ids, response_mask, sampler_logp: [B, L]."""
    B, P, L = len(rollouts), max(len(r.prompt_ids) for r in rollouts), max(max(len(r.ids) for r in rollouts), 1)
    ids = torch.full((B, P + L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + L, dtype=torch.long)
    samp = torch.zeros(B, L)
    for b, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.ids)
        ids[b, P - p:P] = torch.tensor(r.prompt_ids)
        ids[b, P:P + n] = torch.tensor(r.ids, dtype=torch.long)
        attn[b, P - p:P + n] = 1
        samp[b, :n] = torch.tensor(r.logprobs[:n])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = dict(input_ids=ids, attention_mask=attn, position_ids=pos, response_ids=ids[:, P:],
               response_mask=attn[:, P:].float(), sampler_logp=samp, prompt_len=P)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def slice_batch(batch: dict, idx) -> dict:
    return {k: v[idx] if torch.is_tensor(v) else v for k, v in batch.items()}


def _chunk_logp(h, w, targets, temperature, with_entropy: bool):
    """h: [N, d] hidden states, w: [V, d] lm head, targets: [N] -> log p(target) [N], entropy [N].
    Float32 also under bf16 autocast: a log-softmax over ~50k-150k logits is where bf16's rounding costs most
    (docs/common.md has the measurement)."""
    with torch.autocast(h.device.type, enabled=False):
        logits = (h.to(w.dtype) @ w.T).float() / temperature  # [N, V]: exists for one chunk only
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    p = torch.softmax(logits, -1)
    return logp, lse - (p * logits).sum(-1)  # H = logsumexp(z) - sum_v p_v z_v


def shared_prompt_states(base, batch: dict, share: bool = True):
    """The decoder's final states that predict each response token: [B, L, d] (position P-1+t predicts y_t).

    A group's G rollouts share one prompt, so (share=True) each distinct prompt goes through the decoder once
    and its keys/values are handed to the G responses (a differentiable index into the KV cache): on GRPO's
    8 prompts x 4 rollouts of ~46 + 64 tokens that is 2416 tokens of forward and backward instead of 3520.
    Same numbers as one pass over [prompt | response] rows up to float rounding (tested), and the same bits on
    every run and every --resume (the backward sums a group's rows in index order; tested). Ours (an
    optimisation, no paper's). Falls back to the one pass when every prompt is distinct."""
    P, L = batch["prompt_len"], batch["response_ids"].shape[1]
    ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    if share:
        keys, inv = torch.unique(torch.cat([ids[:, :P], attn[:, :P]], 1), dim=0, return_inverse=True)  # [U, 2P], [B]
    if not share or len(keys) == len(inv):
        return base(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state[:, P - 1:P + L - 1]
    B, U = len(inv), len(keys)
    from transformers import DynamicCache
    first = torch.full((U,), B, device=ids.device).scatter_reduce_(0, inv, torch.arange(B, device=ids.device), "amin")
    cache = DynamicCache(config=base.config)
    hp = base(input_ids=ids[first, :P], attention_mask=attn[first, :P], position_ids=pos[first, :P],
              past_key_values=cache, use_cache=True).last_hidden_state  # [U, P, d]
    # every layer's keys/values [U, ...] -> [B, ...] by index_select, not cache.batch_select_indices: that one
    # indexes keys[inv], whose backward is index_put_(accumulate=True), summed with atomic adds on CPU (the G
    # rows of a prompt land on one row in a thread-dependent order: ~1e-6 run-to-run drift); index_select's
    # backward (index_add_) sums in index order, so a run and its --resume agree to the bit
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, inv), layer.values.index_select(0, inv)
    hr = base(input_ids=ids[:, P:], attention_mask=attn, position_ids=pos[:, P:], past_key_values=cache,
              use_cache=True).last_hidden_state  # [B, L, d]
    return torch.cat([hp[:, P - 1:P].index_select(0, inv), hr[:, :L - 1]], 1)


def forward_logprobs(model, batch: dict, temperature: float = 1.0, chunk: int = 1024, entropy: bool = False,
                     hidden_layer: int | None = None, share_prompts: bool = False) -> dict:
    """Per-token log pi(y_t | x, y_<t) of the response tokens, from one forward pass.

    The lm head and log-softmax run on `chunk` response tokens at a time under activation checkpointing,
    so the [B, T, V] logits tensor never exists, neither in forward nor in backward (each chunk's logits
    are rebuilt during backward); chunk=0 trades that memory for speed: one chunk, kept for backward, no
    recompute. Returns logp [B, L], entropy [B, L] (if asked), and
    hidden [B, P+L, d], the output of decoder layer `hidden_layer` (1-based, the residual stream before
    the final norm; if asked). share_prompts: rows with the same prompt run it once (shared_prompt_states;
    not with hidden_layer, whose hook wants one pass, nor under decoder checkpointing, which drops the cache).
    """
    base, head = model.get_decoder(), model.get_output_embeddings()
    captured, hook = {}, None
    if hidden_layer is not None:  # a hook keeps one layer's states, not all of them (output_hidden_states would)
        if not 1 <= hidden_layer <= len(base.layers):
            raise ValueError(f"hidden_layer={hidden_layer}: the model has decoder layers 1..{len(base.layers)}")
        hook = base.layers[hidden_layer - 1].register_forward_hook(
            lambda mod, inp, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    share = share_prompts and hook is None and not getattr(base, "is_gradient_checkpointing", False)
    try:
        h = shared_prompt_states(base, batch, share)  # [B, L, d]: the state that predicts response token t
    finally:
        if hook is not None:
            hook.remove()
    B, L, d = h.shape
    flat_h, flat_y = h.reshape(B * L, d), batch["response_ids"].reshape(B * L)
    keep = batch["response_mask"].reshape(B * L).bool()  # skip padding: no logits for it at all
    idx = keep.nonzero()[:, 0]
    logp = torch.zeros(B * L, device=h.device, dtype=torch.float32)
    ent = torch.zeros(B * L, device=h.device, dtype=torch.float32)
    grad = torch.is_grad_enabled()
    step = chunk if chunk > 0 else max(len(idx), 1)  # chunk 0: one chunk, no recompute (its logits stay alive)
    for s in range(0, len(idx), step):
        j = idx[s:s + step]
        args = (flat_h[j], head.weight, flat_y[j], temperature, entropy)
        lp, en = checkpoint(_chunk_logp, *args, use_reentrant=False) if grad and chunk > 0 else _chunk_logp(*args)
        logp, ent = logp.index_put((j,), lp), ent.index_put((j,), en)
    res = {"logp": logp.view(B, L)}
    if entropy:
        res["entropy"] = ent.view(B, L)
    if hidden_layer is not None:
        res["hidden"] = captured["h"]
    return res


@torch.no_grad()
def logprobs_no_grad(model, batch: dict, temperature: float, chunk: int, micro: int):
    """forward_logprobs in micro-batches of rows, without autograd (old / reference log-probs): [B, L]."""
    B = batch["response_ids"].shape[0]
    return torch.cat([forward_logprobs(model, slice_batch(batch, slice(s, s + micro)), temperature, chunk)["logp"]
                      for s in range(0, B, micro)])


# -------------------- Losses ---------------------------------------------------------------------


def masked_mean(x, mask, dim=None):
    """Mean over the entries where mask is 1 (over `dim`, or all); an empty mask gives 0."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = False):
    """(x - mean) * rsqrt(var + eps), mean and var over the n unmasked entries; padding neither counts nor
    changes (it comes out 0; verl leaves whitened numbers there, which every consumer masks).
    var divides by n (ours, the default) or, unbiased=True, by n - 1 as verl's and TRL's masked_whiten do: the
    results differ by the factor sqrt(n / (n - 1)), 1.0005 at n = 1000 tokens. shift_mean=False adds the mean
    back after scaling (verl's meaning)."""
    mean, n = masked_mean(x, mask), mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)  # n = 1: var 0 (verl raises)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_penalty(logp, ref_logp, kind: str = "k3"):
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence"), x = log pi(y) - log pi_ref(y):  k1 = x,  k2 = x^2 / 2,  k3 = exp(-x) + x - 1 >= 0.
    k1 and k3 are unbiased for the KL; k3 has the lower variance. No clamp, as TRL's GRPOTrainer; verl's
    k3 ("low_var_kl") clamps x to [-20, 20] and k3 to [-10, 10]. Unclamped, a token far less likely under pi
    than under pi_ref costs ~exp(-x), and an overflow to inf makes minibatch_update skip that step."""
    log_ratio = logp - ref_logp  # log pi/pi_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":  # exp(-x) - (-x) - 1 >= 0, unbiased, low variance
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"kl_type must be k1, k2 or k3, got {kind!r}")


def aggregate(loss_mat, mask, mode: str, max_len: int | None = None):
    """Reduce a per-token loss [B, L] to a scalar; |y_i| is response i's number of real tokens.
    token-mean:              sum_{i,t} l_it / sum_i |y_i|        (DAPO; verl's default; TRL "dapo"/"bnpo")
    seq-mean-token-mean:     1/B sum_i (1/|y_i| sum_t l_it)     (GRPO paper; TRL "grpo")
    seq-mean-token-sum-norm: 1/B sum_i (sum_t l_it / max_len)   (Dr.GRPO: no length bias; TRL "dr_grpo")
    max_len: the caller's constant (policy_update passes --max-new-tokens, as TRL's max_completion_length and
    Dr.GRPO's fixed maximum); without it the padded width L, which varies from batch to batch (verl's default
    is its padded width, there the fixed response length). A row with no real token counts in B with loss 0,
    as in TRL; verl leaves it out of B."""
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        return ((loss_mat * mask).sum(-1) / (max_len or loss_mat.shape[-1])).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip=0.0, agg="token-mean",
                max_len=None, ref_logp=None, kl_coef=0.0, kl_type="k3"):
    """Clipped surrogate, per token t of response i (all tensors [B, L]):
        ratio = exp(logp - logp_old)
        l = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        dual-clip (A < 0): l = min(l, -A * c)
        + beta * KL(pi || pi_ref) per token when kl_coef > 0.
    With one update per batch, ratio == 1 and the loss value is ~0 (or -mean A), but its gradient,
    A * grad log pi, is not zero: a flat loss curve is expected, watch reward and grad_norm instead.
    Returns (loss, stats) with stats = clip_frac, kl (detached floats). Conventions, against verl's
    compute_policy_loss_vanilla and TRL's GRPOTrainer (pinned in tests/test_reference_conventions.py):
      - the log-ratio is not clamped (verl clamps it to [-20, 20] before exp; TRL does not);
      - dual-clip applies where A < 0 and only when asked (dual_clip = c > 1); verl applies it always, with
        c = 3 by default; TRL's `delta` caps the ratio of every token, the same loss when delta > 1 + eps_high;
      - clip_frac is the share of real tokens whose clipped term is the larger (verl's pg_clipfrac); tokens
        capped by dual-clip are not counted (verl logs them as pg_clipfrac_lower)."""
    if dual_clip != 0 and dual_clip <= 1:
        raise ValueError(f"dual_clip must be 0 (off) or > 1 (it caps -A * ratio at -A * c), got {dual_clip}")
    ratio = torch.exp(logp - old_logp)  # pi / pi_old
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss_mat = torch.maximum(l1, l2)
    if dual_clip > 0:
        loss_mat = torch.where(adv < 0, torch.minimum(loss_mat, -adv * dual_clip), loss_mat)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_type)
        loss_mat = loss_mat + kl_coef * kl
    loss = aggregate(loss_mat, mask, agg, max_len)
    with torch.no_grad():
        clip_frac = masked_mean((l2 > l1).float(), mask).item()
    return loss, {"clip_frac": clip_frac, "kl": masked_mean(kl.detach(), mask).item()}


# -------------------- The policy update (shared by every method; the method supplies the advantages) 


@contextlib.contextmanager
def update_mode(model, checkpointing: bool, autocast: str = "off"):
    """Around an update's forward/backward.
    checkpointing: each decoder layer's activations are recomputed in backward instead of stored; transformers
    only does that in train mode, so the model is in train mode here (dropout, if a model had any, would be on
    too: ours have none) and back in eval mode for sampling, whose KV cache checkpointing would switch off.
    autocast "bf16": matmuls in bfloat16, weights, gradients and optimizer state stay float32 (mixed precision);
    the lm head and log-softmax stay float32 (_chunk_logp). "auto": bf16 on a GPU, off on CPU."""
    lm = getattr(model, "backbone", model)  # ppo.ValueModel checkpoints its decoder
    dev = next(model.parameters()).device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast == "bf16" or (autocast == "auto" and dev == "cuda")):
        if not checkpointing:
            yield
            return
        if not lm.is_gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
        try:
            yield
        finally:
            lm.eval()


def adamw(params, lr: float, weight_decay: float = 0.0):
    """AdamW with PyTorch's fused kernel: one pass over all parameters instead of a Python loop over tensors.
    Same algorithm, same state_dict."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def minibatch_update(optimizer, mask, args, loss_fn, agg: str = "token-mean", skip=None) -> dict:
    """`args.epochs` passes over the B rows of a batch; each mini-batch of `args.minibatch_size` rows is one
    optimizer step, accumulated over micro-batches of `args.micro_batch_size` rows so memory stays flat.
    loss_fn(rows) -> (loss aggregated over those rows, {stat: float}). Each micro-batch loss is scaled by
    its share of the mini-batch (tokens for token-mean, rows otherwise), so the accumulated gradient is
    exactly the mini-batch's. skip: [B] bool, rows known to add exactly 0 (they still count in the share).
    A non-finite loss or gradient skips that optimizer step: weights and optimizer moments are untouched."""
    B = mask.shape[0]
    mb, params = args.minibatch_size or B, [p for g in optimizer.param_groups for p in g["params"]]
    stats, skips, gen = {}, 0, torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=args.epochs * B, desc="update", unit="row", disable=None, leave=False)  # a terminal only
    for _ in range(args.epochs):
        order = torch.randperm(B, generator=gen) if mb < B else torch.arange(B)
        for s in range(0, B, mb):
            rows = order[s:s + mb]
            active = rows if skip is None else rows[~skip[rows]]
            if len(active) == 0:
                continue  # nothing to learn from this mini-batch
            n_tok, ok = mask[rows].sum().clamp(min=1), True
            optimizer.zero_grad(set_to_none=True)
            for m in range(0, len(active), args.micro_batch_size):
                r = active[m:m + args.micro_batch_size]
                loss, st = loss_fn(r)
                if not torch.isfinite(loss):
                    ok = False
                    break
                (loss * (mask[r].sum() / n_tok if agg == "token-mean" else len(r) / len(rows))).backward()
                for k, v in st.items():
                    stats.setdefault(k, []).append(v)
                bar.update(len(r))
            gn = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if ok else None
            if gn is None or not torch.isfinite(gn):
                optimizer.zero_grad(set_to_none=True)
                skips += 1
                continue
            optimizer.step()
            stats.setdefault("grad_norm", []).append(gn.item())
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before sampling (memory_plan counts on it)
    return {**{k: float(np.mean(v)) for k, v in stats.items()}, "nan_skips": skips}


def rows_without_signal(adv, ref_logp=None):
    """[B] bool, the rows of adv [B, L] that add exactly 0 to the loss and its gradient: all their advantages are
    0 and there is no KL term. They need no forward/backward (they still count in the loss's normaliser);
    None when every row counts."""
    return None if ref_logp is not None else ~(adv != 0).any(-1)


def policy_update(policy, optimizer, batch: dict, adv, args, old_logp=None, ref_logp=None) -> dict:
    """Clipped-surrogate update of the policy on per-token advantages adv [B, L] (see minibatch_update).
    logp_old: given, or computed once up front when there is more than one optimizer step per batch.
    Rows that add exactly 0 (rows_without_signal) get no forward/backward."""
    B, mask = adv.shape[0], batch["response_mask"]

    def loss_fn(r):
        mbatch = slice_batch(batch, r)
        fw = forward_logprobs(policy, mbatch, args.temperature, args.logp_chunk, entropy=True,
                              share_prompts=args.share_prompts)
        o = old_logp[r] if old_logp is not None else fw["logp"].detach()  # mu=1: pi_old == pi, no 2nd pass
        loss, st = policy_loss(fw["logp"], o, adv[r], mbatch["response_mask"], args.eps_low, args.eps_high,
                               args.dual_clip, args.loss_agg, args.max_new_tokens,
                               None if ref_logp is None else ref_logp[r], args.kl_coef, args.kl_type)
        m = mbatch["response_mask"]
        return loss, {**st, "entropy": masked_mean(fw["entropy"].detach(), m).item(),
                      "logp_diff": masked_mean((fw["logp"].detach() - mbatch["sampler_logp"]).abs(), m).item()}
    skip = rows_without_signal(adv, ref_logp)
    with update_mode(policy, args.grad_checkpointing, args.autocast):
        if old_logp is None and (args.epochs > 1 or 0 < args.minibatch_size < B):  # off-policy after the 1st step
            old_logp = logprobs_no_grad(policy, batch, args.temperature, args.logp_chunk, args.micro_batch_size)
        return minibatch_update(optimizer, mask, args, loss_fn, args.loss_agg, skip)


# -------------------- Evaluation, logging, checkpoints -------------------------------------------


def success_rates(sampler, tok, problems: list[Problem], k: int, max_new_tokens: int, temperature: float,
                  seed: int) -> np.ndarray:
    """Monte-Carlo estimate of each prompt's success rate p(x) from k fresh rollouts (the 'oracle')."""
    rollouts = sampler.generate([build_prompt(tok, p) for p in problems], k, max_new_tokens, temperature, seed=seed)
    r, _ = score_rollouts(rollouts, problems)
    hits = np.zeros(len(problems))
    np.add.at(hits, [x.prompt_idx for x in rollouts], r)
    return hits / k


def oracle_baseline_mse(sampler, tok, problems: list[Problem], baseline, args, seed: int) -> dict:
    """The baseline_mse diagnostic every method logs: a method's per-prompt baseline b(x) (0/1 reward scale,
    [N]) against p_hat(x) from args.oracle_k fresh rollouts that never enter training.
        baseline_mse = mean_x (b(x) - p_hat(x))^2
        oracle_var   = mean_x p_hat(1 - p_hat) / (K - 1)   (the oracle's own noise, included in the MSE)"""
    p_hat = success_rates(sampler, tok, problems, args.oracle_k, args.max_new_tokens, args.temperature, seed)
    return {"baseline_mse": float(np.mean((np.asarray(baseline, dtype=float) - p_hat) ** 2)),
            "oracle_var": float(np.mean(p_hat * (1 - p_hat) / max(args.oracle_k - 1, 1)))}


def evaluate(sampler, tok, problems: list[Problem], max_new_tokens: int, n: int = 1, temperature: float = 0.0,
             seed: int = 0) -> float:
    """Accuracy (greedy, n=1) or mean@n (temperature > 0) on a problem set (NaN for an empty set)."""
    if not problems:
        return float("nan")
    return float(success_rates(sampler, tok, problems, n, max_new_tokens, temperature, seed).mean())


def run_eval(sampler, tok, problems: list[Problem], args) -> float:
    """A run's eval_acc: greedy accuracy with --eval-n 1, mean@n at --temperature above."""
    return evaluate(sampler, tok, problems, args.max_new_tokens, args.eval_n,
                    args.temperature if args.eval_n > 1 else 0.0, seed=args.seed)


def peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; process peak RSS


def batch_metrics(group_rewards, rollout_adv: torch.Tensor, rollouts: list[Rollout], no_answer: int) -> dict:
    """The batch metrics every method logs, with one meaning each (README: Metrics).
    group_rewards: each prompt's rollout rewards (groups may differ in size); rollout_adv: [B] one advantage a
    rollout (a per-token method passes each rollout's mean over its real tokens); rollouts: the B trained on."""
    flat = [float(min(g) == max(g)) for g in group_rewards if len(g) > 1]  # a group of one has no spread
    lengths = [len(r.ids) for r in rollouts]
    return {"adv_std": rollout_adv.std().item() if rollout_adv.numel() > 1 else 0.0,
            "frac_reward_zero_std": float(np.mean(flat)) if flat else None,
            "rollouts": len(rollouts), "tokens": int(sum(lengths)),
            "resp_len": float(np.mean(lengths)) if lengths else 0.0, "no_answer": no_answer,
            "clipped_ratio": float(np.mean([r.finish == "length" for r in rollouts])) if rollouts else 0.0}
