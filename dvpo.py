"""DVPO: pretrain a global value model once, then optimise the policy against it, frozen.

Paper
  Pretrain Value, Not Reward: Decoupled Value Policy Optimization (Huang et al., ICLR 2026; first posted as
  arXiv 2502.16944, "Lean and Mean: Decoupled Value Policy Optimization with Global Value Guidance").
  Code: microsoft/DKI_LLM, folder dvpo ("official" below: recipe values read from that code).

What the method is
  PPO trains a critic as large as the policy on every batch (ppo.py); DVPO trains a token-level global value model
  (GVM) once, then keeps it frozen: no critic forward-backward, critic optimizer state or reward model in stage 2.
  Stage 1, `python dvpo.py pretrain`: the GVM (ppo.ValueModel: an LM + a zero-initialised scalar head) regresses
  onto TD(lambda) returns bootstrapped on its own predictions, the sequence's score r on its last token (+1 chosen
  / -1 rejected for preference pairs; the verifier's 0/1 for rollouts):
      delta_t = r_t + gamma V(s_{t+1}) - V(s_t)                   (V after the last token is 0)
      G_t     = V(s_t) + sum_l (gamma lambda)^l delta_{t+l}       gamma 1, lambda 0.95
      L       = 0.5 masked mean_t (V(s_t) - G_t)^2                (G from the values before the batch's first step)
  Stage 2, `python dvpo.py train --gvm DIR`: PPO with the frozen GVM's values for a critic's, in two settings
  (--variant). paper, the official policy phase:
      V_t  <- whiten(V_GVM(s_t)), each row over all its positions, prompt and response
      r_t   = -beta (log pi(y_t) - log pi_ref(y_t))               (the KL penalty is the only reward)
      A_t   = GAE(r, V; gamma 1, lambda 0.95), whitened over the batch; clipped surrogate (eps 0.2), 4 epochs
      beta adaptive (Ziegler et al. 2019): from 0.2 towards a summed KL of 6 per response
  With gamma = lambda = 1 and no reward, A_t telescopes to -V_t: the task signal lives in lambda < 1,
  A_t = (1 - lambda) sum_{m>=1} lambda^(m-1) V_{t+m} - V_t, i.e. tokens after which the value rises.
  rlvr (the default, ours): the verifier's r in {0, 1} added on the last token, the GVM's values raw (the 0/1 scale
  they were trained on), no KL, lambda 1, so A_t = r - V_t: the GVM is a baseline whose errors cost variance, never
  bias (at lambda < 1, r reaches token t only with weight lambda^(T-1-t): docs/dvpo.md). Our reward is exact and free.

Equation -> function
  G_t ........................ td_lambda_targets     stage 1 loss and step .... gvm_update (ppo.value_loss)
  r_t, both settings ......... dvpo_rewards          V_GVM, whitened .......... gvm_all_values, response_values
  GAE, whitened A ............ dvpo_advantages       beta ..................... adaptive_kl

Choices that are ours, not the paper's [official, where it differs]
  - Stage 1 data: the policy's rollouts scored by the verifier (RLVR), on problems drawn with another seed than
    stage 2's; preference pairs (--pairs, as official) can be added or used alone. Every row is read behind the
    chat prompt the policy sees [the raw question], rollouts with their sampled ids: the GVM reads what stage 2 shows.
  - The GVM starts from the policy's weights (or --gvm-model); --gvm-holdout of the prompts measure it.
  - --whiten-values leaves padding out [unmasked over each forward micro-batch, its left padding included].
  - explained_variance in stage 2: the raw GVM values against each token's realised return (the outcome).
  - Recipe at CPU scale: full fine-tuning, AdamW at a constant --gvm-lr and --lr [LoRA r 8 and r 16, Adafactor 1.41e-5
    and 2e-6 decaying linearly]; GVM batches of 16, one step each [32, 2 passes of one-row steps: see --help]; the
    policy one step per batch [--epochs 4], gradients clipped at 1 [not], a fixed --max-new-tokens [drawn from 32..639
    per batch], no mini-batch skipped [when its mean ratio > 10] (why: docs/dvpo.md).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import common as C
import ppo
from common import arg

# --preset paper (ours, sized to one 80 GB GPU, docs/gpu.md): Qwen3-1.7B against a Qwen3-0.6B GVM (the paper: 3B and
# 8B policies on several GPUs); the frozen GVM and the KL reference take no optimizer state
PRESET = C.presets(cpu=dict(steps=16, prompts_per_step=16, gvm_model=""),
                   paper=dict(model="Qwen3-1.7B", gvm_model="Qwen3-0.6B", prompts_per_step=128, micro_batch_size=1))
VARIANTS = {  # --variant presets: each sets every field below whose default is None; explicit values win
    "rlvr": {"whiten_values": False, "kl_coef": 0.0, "kl_target": 0.0, "lam": 1.0},
    "paper": {"whiten_values": True, "kl_coef": 0.2, "kl_target": 6.0, "lam": 0.95},  # the official code's
}


@dataclass
class Args(C.TrainArgs):
    """DVPO: pretrain a global value model (GVM) on scored sequences, then PPO against it frozen."""
    out: str = arg("runs/dvpo", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"variant": VARIANTS, "preset": PRESET}
    # stage 2: the policy
    group_size: int = arg(1, "stage 2: rollouts per prompt (DVPO needs no groups)")
    variant: str = arg("rlvr", "stage 2 preset of --whiten-values, --kl-coef, --kl-target, --lam (explicit values "
                       "win): rlvr (ours: terminal reward, raw values, lambda 1) or paper (official: KL reward only, "
                       "row-whitened values, adaptive beta, lambda 0.95)", choices=list(VARIANTS))
    gvm: str = arg("", "stage 2: the GVM folder that `dvpo.py pretrain --out DIR` wrote (with no subcommand: OUT/gvm)")
    whiten_values: bool | None = arg(None, "stage 2: whiten the GVM's values per row over all its positions (official)")
    kl_coef: float | None = arg(None, "stage 2: beta of the KL reward (its start when --kl-target > 0)")
    kl_target: float | None = arg(None, "stage 2: adaptive beta's target mean summed KL per response (0: beta fixed)")
    gamma: float = arg(1.0, "discount gamma (both stages)")
    lam: float | None = arg(None, "stage 2: GAE lambda")
    whiten_adv: bool = arg(True, "whiten advantages over the batch's real tokens")
    # stage 1: the GVM
    gvm_model: str | None = arg(None, "GVM backbone: '' starts it from the policy (--model); or a model with its "
                                "tokenizer (default: set by --preset)")
    rollouts: str = arg("", "stage 1: {prompt, response, score} rows to reuse (.jsonl; '': collect OUT/rollouts.jsonl)")
    collect_problems: int = arg(80, "stage 1: problems of --data to collect rollouts on")
    collect_n: int = arg(4, "stage 1: rollouts per problem")
    pairs: str = arg("", "stage 1: preference pairs, a .jsonl of {prompt, chosen, rejected} rows (optional)")
    pair_scores: str = arg("1,-1", "stage 1: scores of a pair's chosen and rejected response (official: +1, -1)")
    gvm_lam: float = arg(0.95, "stage 1: lambda of the TD(lambda) targets (official: 0.95)")
    gvm_epochs: int = arg(1, "stage 1: passes over the GVM's training rows")
    gvm_batch: int = arg(16, "stage 1: rows per batch, whose targets are computed once (official: 32)")
    gvm_batch_epochs: int = arg(1, "stage 1: passes over each batch on its fixed targets (official: 2)")
    gvm_minibatch: int = arg(0, "stage 1: rows per GVM optimizer step (0: the whole batch; official: 1)")
    gvm_lr: float = arg(5e-5, "stage 1: GVM AdamW learning rate")
    gvm_holdout: float = arg(0.125, "stage 1: share of prompts kept out of training to measure the GVM")

    def __post_init__(self):
        super().__post_init__()
        C.check_ranges(self, lam=(0, 1), gvm_lam=(0, 1), gamma=(0, 1), kl_coef=(0, None), kl_target=(0, None),
                         gvm_minibatch=(0, None), group_size=(1, None), collect_n=(1, None), gvm_epochs=(1, None),
                         gvm_batch=(1, None), gvm_batch_epochs=(1, None))
        if not 0 <= self.gvm_holdout < 1:
            raise ValueError(f"--gvm-holdout must be in [0, 1), got {self.gvm_holdout}")
        if self.kl_target > 0 and self.kl_coef == 0:
            raise ValueError("--kl-target > 0 needs --kl-coef > 0 (the controller scales beta: from 0 it stays 0)")
        try:
            chosen, rejected = map(float, self.pair_scores.split(","))
        except ValueError:
            raise ValueError(f"--pair-scores must be two numbers 'chosen,rejected', got {self.pair_scores!r}") from None


# -------------------- The math: targets, rewards, values, advantages (pure functions on [B, L] tensors)


def td_lambda_targets(score, values, mask, gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """Stage 1's G_t [B, L], the lambda-return: score [B] on each last real token, values [B, L] the GVM's V(s_t)."""
    return ppo.gae(ppo.token_rewards(score, mask), values, mask, gamma, lam)[1]


def realised_returns(score, mask, gamma: float = 1.0) -> torch.Tensor:
    """The outcome's return-to-go [B, L]: gamma^(T-1-t) * score (with gamma = 1: the score on every token)."""
    return ppo.gae(ppo.token_rewards(score, mask), torch.zeros_like(mask), mask, gamma, 1.0)[1]


def dvpo_rewards(score, mask, variant: str, logp=None, ref_logp=None, beta: float = 0.0) -> torch.Tensor:
    """Stage 2's r_t [B, L]: -beta (log pi - log pi_ref) on every real token; rlvr (ours) adds the score on the last."""
    task = score if variant == "rlvr" else torch.zeros_like(score)
    return ppo.token_rewards(task, mask, logp, ref_logp, beta)


def whiten_rows(x, attn, eps: float = 1e-8) -> torch.Tensor:
    """x, attn [B, N] -> each row b: (x - mean_b) / sqrt(var_b + eps) over its real positions (attn = 1), var_b
    with n - 1 (torch.var, as TRL's whiten that the official code calls on each row); padding -> 0."""
    n = attn.sum(-1, keepdim=True)
    mean = (x * attn).sum(-1, keepdim=True) / n.clamp(min=1)
    var = ((x - mean) ** 2 * attn).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * attn


def response_values(v_all, batch: dict, whiten: bool = False) -> torch.Tensor:
    """V_GVM at every position [B, P+L] -> V(s_t) [B, L] before each response token; whiten: rows first (official)."""
    P, L = batch["prompt_len"], batch["response_ids"].shape[1]
    v_all = whiten_rows(v_all, batch["attention_mask"]) if whiten else v_all
    return v_all[:, P - 1:P + L - 1] * batch["response_mask"]


def dvpo_advantages(values, rewards, mask, gamma: float = 1.0, lam: float = 0.95, whiten_adv: bool = True):
    """A [B, L] = GAE(r, V; gamma, lambda) on the GVM's values V [B, L], whitened over real tokens if whiten_adv."""
    adv, _ = ppo.gae(rewards, values, mask, gamma, lam)
    return C.masked_whiten(adv, mask) if whiten_adv else adv


def adaptive_kl(beta: float, kl: float, n: int, target: float, horizon: float = 10_000.0) -> float:
    """The adaptive KL controller (Ziegler et al. 2019; TRL's, which the official code uses). After a batch of n
    responses whose summed KL per response is kl on average: beta <- beta (1 + clip(kl/target - 1, +-0.2) n/horizon)."""
    return beta * (1 + float(np.clip(kl / target - 1, -0.2, 0.2)) * n / horizon)


# -------------------- Stage 1: scored sequences, the GVM's update and report, pretrain ------------


def collect_rows(sampler, tok, problems: list[C.Problem], n: int, args, seed: int) -> list[dict]:
    """n rollouts of each problem, scored by the verifier: rows {prompt, response, response_ids, score, finish}."""
    rollouts, correct, _ = C.rollouts_scored(sampler, tok, problems, n, args, seed, desc="collect")
    return [{"prompt": problems[r.prompt_idx].question, "response": r.text, "response_ids": r.ids, "score": s,
             "finish": r.finish, "answer": problems[r.prompt_idx].answer} for r, s in zip(rollouts, correct)]


def read_scored(path) -> list[dict]:
    """Rows {prompt: str, response: str, score: number, [response_ids: [int], finish]}; file:line on a bad row."""
    rows = []
    for i, row in C.read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}:{i}: needs string fields 'prompt' and 'response'")
        if not isinstance(row.get("score"), (int, float)) or isinstance(row["score"], bool) \
                or not math.isfinite(row["score"]):
            raise ValueError(f"{path}:{i}: 'score' must be a finite number, got {row.get('score')!r}")
        ids = row.get("response_ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            raise ValueError(f"{path}:{i}: 'response_ids' must be a list of token ids")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_pairs(path, chosen: float = 1.0, rejected: float = -1.0) -> list[dict]:
    """Preference rows {prompt, chosen, rejected} -> two scored rows each (official: +1 chosen, -1 rejected)."""
    rows = []
    for i, row in C.read_jsonl(path):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{path}:{i}: a pair needs string fields 'prompt', 'chosen' and 'rejected'")
        rows += [{"prompt": row["prompt"], "response": row["chosen"], "score": chosen},
                 {"prompt": row["prompt"], "response": row["rejected"], "score": rejected}]
    if not rows:
        raise ValueError(f"{path}: no pairs")
    return rows


def to_sequence(row: dict, tok, eos: int) -> C.Rollout:
    """A scored row as the token sequence the GVM reads: the chat prompt the policy sees, then the response
    (its sampled ids when the row has them, else the tokenised text closed by eos unless it was cut)."""
    prompt_ids = tok(C.build_prompt(tok, C.Problem("", row["prompt"], "")), add_special_tokens=False)["input_ids"]
    ids = row.get("response_ids")
    if ids is None:
        ids = tok(row["response"], add_special_tokens=False)["input_ids"]
        ids = ids + ([eos] if row.get("finish", "stop") == "stop" else [])
    return C.Rollout(0, prompt_ids, list(ids), row["response"], [0.0] * len(ids), row.get("finish", "stop"))


def gvm_report(gvm, seqs: list[C.Rollout], scores: torch.Tensor, const: float, args, pad_id: int, dev) -> dict:
    """The GVM on held-out rows: V(s_0) against the outcome, next to a constant (the training mean score), and
    token-level explained variance."""
    if not seqs:
        return {}
    batch = C.collate(seqs, pad_id, dev)
    mask = batch["response_mask"]
    values = ppo.critic_values(gvm, batch, args.micro_batch_size)  # [N, L]
    s0, y = values[:, 0].cpu().numpy(), scores.numpy()
    label = y > (y.max() + y.min()) / 2
    return {"gvm_heldout_mse": float(np.mean((s0 - y) ** 2)),
            "gvm_heldout_const_mse": float(np.mean((const - y) ** 2)), "gvm_heldout_auc": C.roc_auc(s0, label),
            "gvm_heldout_ev": ppo.explained_variance(values, realised_returns(scores.to(dev), mask, args.gamma), mask)}


def gvm_update(gvm, optimizer, batch: dict, score, args) -> dict:
    """One batch of stage 1 (score [B]): G_t [B, L] held fixed, args.epochs passes of args.minibatch_size-row steps.
    One step per batch: G from the detached values of the forward the loss differentiates (one forward fewer)."""
    mask, score = batch["response_mask"], score.to(batch["response_mask"].device)
    one_step = args.epochs == 1 and args.minibatch_size in (0, len(mask))
    G = None if one_step else td_lambda_targets(score, ppo.critic_values(gvm, batch, args.micro_batch_size), mask,
                                                args.gamma, args.gvm_lam)  # [B, L], no gradient

    def loss_fn(r):
        v = gvm(C.slice_batch(batch, r))  # [b, L]
        g = td_lambda_targets(score[r], v.detach(), mask[r], args.gamma, args.gvm_lam) if G is None else G[r]
        loss = ppo.value_loss(v, v.detach(), g, mask[r], clip=0.0)
        return loss, {"value_loss": loss.item(), "explained_variance": ppo.explained_variance(v.detach(), g, mask[r]),
                      "value_mean": C.masked_mean(v.detach(), mask[r]).item()}
    with C.update_mode(gvm, args.grad_checkpointing, args.autocast):
        st = C.minibatch_update(optimizer, mask, args, loss_fn, "token-mean")
    return {k: st.get(k, float("nan")) for k in ("value_loss", "explained_variance", "value_mean", "grad_norm",
                                                   "nan_skips")}


def pretrain(args: Args) -> Path:
    """Collect (or read) scored sequences, train the GVM on TD(lambda) targets, write OUT/gvm.json + OUT/ckpt/gvm."""
    C.start_run(args, "dvpo pretrain", free=("gvm_epochs",))  # OUT/config.json; --resume may add epochs
    out = Path(args.out)
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    rows_file = Path(args.rollouts) if args.rollouts else out / "rollouts.jsonl"
    t0 = time.perf_counter()
    if not args.rollouts and not (args.resume and rows_file.exists()):
        rows = []
        if args.collect_problems > 0:  # another draw than stage 2's ProblemStream(seed): the GVM is to generalise
            problems = random.Random(args.seed + 1).sample(C.load_problems(args.data), args.collect_problems)
            sampler = C.sampler_for(args, policy, tok, path, dtype, problems)
            rows = collect_rows(sampler, tok, problems, args.collect_n, args, seed=C.rollout_seed(args.seed, 0, 17))
            del sampler
        C.write_jsonl(rows_file, rows)
    time_collect = time.perf_counter() - t0  # ~0 when the rows are read, not sampled
    rows = [] if not args.rollouts and rows_file.stat().st_size == 0 else read_scored(rows_file)
    if args.pairs:
        chosen, rejected = (float(x) for x in args.pair_scores.split(","))
        rows += read_pairs(args.pairs, chosen, rejected)
    if len(rows) < 2:
        raise SystemExit(f"stage 1 has {len(rows)} scored rows: collect more (--collect-problems) or give --pairs")

    if args.gvm_model:
        lm, base = ppo.second_model(args.gvm_model, policy, tok, path, dev, dtype, "--gvm-model")
        del policy
    else:
        lm, base = policy, args.model  # stage 1 never samples again: the policy's weights become the GVM's
    gvm = ppo.ValueModel(lm)
    optimizer = C.adamw(gvm.parameters(), args.gvm_lr)
    eos = C.eos_ids(lm, tok)[0]
    seqs = [to_sequence(r, tok, eos) for r in rows]
    scores = torch.tensor([float(r["score"]) for r in rows])  # [N]
    train, held = C.split_by_key(range(len(rows)), lambda i: rows[i]["prompt"], args.gvm_holdout, args.seed)
    const = float(scores[train].mean())
    per_epoch = math.ceil(len(train) / args.gvm_batch)
    total = per_epoch * args.gvm_epochs
    start = 0
    if args.resume and (out / "ckpt" / "state.pt").exists():
        start = C.load_checkpoint(str(out), {"gvm": (gvm, optimizer)})["step"]
    logger = C.RunLogger(str(out), start, args.report_to)
    logger.CONSOLE = ["value_loss", "explained_variance", "gvm_heldout_mse", "gvm_heldout_const_mse", "gvm_heldout_auc"]
    per_batch = dataclasses.replace(args, epochs=args.gvm_batch_epochs, minibatch_size=args.gvm_minibatch)
    held_seqs = [seqs[i] for i in held]
    report = lambda: gvm_report(gvm, held_seqs, scores[held], const, args, tok.pad_token_id, dev)  # noqa: E731

    if start == 0:
        logger.log(0, {"gvm_rows": len(train), "gvm_heldout_rows": len(held), "time_collect": time_collect, **report()})
    for step in C.tqdm(range(start + 1, total + 1), desc="gvm", initial=start, total=total):
        t0 = time.perf_counter()
        idx = [train[j] for j in C.shuffled_batch(step, len(train), args.gvm_batch, args.seed)]
        batch = C.collate([seqs[j] for j in idx], tok.pad_token_id, dev)
        metrics = {"tokens": int(batch["response_mask"].sum()),
                   **gvm_update(gvm, optimizer, batch, scores[idx], per_batch)}
        if step % per_epoch == 0:  # end of a pass: measure on the held-out prompts
            metrics.update(report())
        metrics.update(time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == total or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(str(out), step, {"gvm": (gvm, optimizer)}, keep=args.keep_checkpoints)
    meta = {"base": str(Path(base).resolve()) if Path(base).exists() else base, "rows": len(rows),
            "train_rows": len(train), "heldout_rows": len(held), "gamma": args.gamma, "lam": args.gvm_lam,
            "data": str(rows_file), "pairs": args.pairs, "steps": total, "final": report()}
    with C.atomic_file(out / "gvm.json") as tmp:  # written last: its presence means stage 1 finished
        tmp.write_text(json.dumps(meta, indent=1))
    return out


# -------------------- Stage 2: PPO against the frozen GVM -----------------------------------------


def load_gvm(folder, tok, device, dtype) -> tuple[ppo.ValueModel, dict]:
    """The GVM that `pretrain` wrote into `folder`, frozen: eval mode, no parameter requires a gradient."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "gvm.json").exists():
        raise SystemExit(f"--gvm {folder}: no gvm.json there; make a GVM first: python dvpo.py pretrain --out {folder}")
    meta = json.loads((folder / "gvm.json").read_text())
    lm, _ = ppo.second_model(meta["base"], None, tok, "", device, dtype, f"--gvm {folder}: its backbone")
    gvm = ppo.ValueModel(lm)
    gvm.load_state_dict({k: v for f in sorted((folder / "ckpt" / "gvm").glob("*.safetensors"))
                         for k, v in load_file(f).items()})
    return gvm.eval().requires_grad_(False), meta


def gvm_all_values(gvm: ppo.ValueModel, batch: dict, micro: int) -> torch.Tensor:
    """V_GVM at every position of [prompt | response], no gradient: [B, P+L] (the official whitening counts all)."""
    return ppo.critic_values(lambda b: gvm(b, all_positions=True), batch, micro)


def train(args: Args):
    if not args.gvm:
        raise SystemExit("dvpo.py train needs --gvm DIR (a folder written by `python dvpo.py pretrain --out DIR`)")
    C.start_run(args, "dvpo train", args.steps)  # OUT/config.json; refuses a mismatched --resume
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    gvm, _ = load_gvm(args.gvm, tok, dev, dtype)  # frozen: no gradient, no optimizer state, never saved again
    optimizer = C.adamw(policy.parameters(), args.lr)
    parts = {"policy": (policy, optimizer)}
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if args.kl_coef > 0 else None  # pi_0, also on --resume
    start, beta = 0, args.kl_coef
    if args.resume:
        state = C.load_checkpoint(args.out, parts)
        start, stream.cursor, beta = state["step"], state["extra"]["cursor"], state["extra"]["kl_coef"]
    frozen = {"GVM": (gvm.config, False), **({"reference": (policy.config, False)} if ref is not None else {})}
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set, others=frozen)
    logger = C.RunLogger(args.out, start, args.report_to)
    G, P, mbs = args.group_size, args.prompts_per_step, args.micro_batch_size

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="dvpo", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> rollouts -> verifiable rewards
        with timer("time_gen"):
            problems = stream.take(P)
            rollouts, correct, no_answer = C.rollouts_scored(sampler, tok, problems, G, args,
                                                               C.rollout_seed(args.seed, step))
        correct = torch.tensor(correct)  # [B], B = P * G, grouped by prompt
        batch = C.collate(rollouts, tok.pad_token_id, dev)
        mask = batch["response_mask"]
        sampler.sleep()  # GPU: the engine frees its memory for the update (--vllm-sleep)

        with timer("time_train"):
            # 2. the method: the frozen GVM's values, per-token rewards, GAE, whitened advantages
            v_all = gvm_all_values(gvm, batch, mbs)  # [B, P+L]
            values = response_values(v_all, batch)  # [B, L] V_GVM(s_t), raw
            old_logp, ref_logp = ppo.kl_logprobs(policy, ref, batch, args)  # None, None without a KL reward
            rewards = dvpo_rewards(correct.to(dev), mask, args.variant, old_logp, ref_logp, beta)
            adv = dvpo_advantages(response_values(v_all, batch, args.whiten_values), rewards, mask, args.gamma,
                                  args.lam, args.whiten_adv)
            realised = realised_returns(correct.to(dev), mask, args.gamma)
            metrics = {"reward": rewards.sum(-1).mean().item(), "acc": correct.mean().item(),
                       "explained_variance": ppo.explained_variance(values, realised, mask),
                       "gvm_value_mean": C.masked_mean(values, mask).item()}

            # 3. the policy update; the GVM takes no step (the KL is in the reward, so out of the loss)
            metrics.update(C.policy_update(policy, optimizer, batch, adv, args, old_logp=old_logp))
            sampler.sync_weights(policy)
            if ref is not None:  # the KL the reward paid (k1 of the sampled tokens), not the loss's (0 here)
                metrics.update(kl=C.masked_mean(old_logp - ref_logp, mask).item(), kl_coef=beta)
                if args.kl_target > 0:  # the controller sees the mean summed KL per response
                    beta = adaptive_kl(beta, ((old_logp - ref_logp) * mask).sum(-1).mean().item(), len(rollouts),
                                       args.kl_target)

        metrics.update(ppo.advantage_metrics(correct, adv, mask, rollouts, no_answer, G))
        if args.oracle_k > 0:  # diagnostic only: the GVM's V(s_0) vs a Monte-Carlo p(x)
            v0 = values[:, 0].view(P, G).mean(-1).cpu().numpy()
            metrics.update(C.oracle_baseline_mse(sampler, tok, problems, v0, args, seed=C.second_seed(args.seed, step)))

        # 4. log, evaluate, checkpoint (the policy only: the GVM never changes)
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, parts, {"cursor": stream.cursor, "gvm": args.gvm, "kl_coef": beta},
                              keep=args.keep_checkpoints)
    return logger.path


def run_all(args: Args):
    """No subcommand: stage 1 into OUT/gvm (skipped when a finished one is there and --resume), then stage 2."""
    stage1 = dataclasses.replace(args, out=str(Path(args.out) / "gvm"))
    if not C.finished_stage(stage1, "dvpo pretrain", Path(stage1.out) / "gvm.json", free=("gvm_epochs",)):
        pretrain(stage1)
    resume2 = args.resume and (Path(args.out) / "ckpt" / "state.pt").exists()  # a crash in stage 1: start stage 2
    return train(dataclasses.replace(args, gvm=args.gvm or stage1.out, resume=resume2,
                                     overwrite=args.overwrite or args.resume))  # a crash before stage 2's checkpoint


COMMANDS = {"pretrain": pretrain, "train": train}

if __name__ == "__main__":
    C.run_command(COMMANDS, run_all, Args)
