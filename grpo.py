"""GRPO, Dr.GRPO and DAPO: the value-free baselines every other method in this repo is measured against.

Papers
  GRPO     DeepSeekMath (Shao et al., 2024), arXiv 2402.03300
  Dr.GRPO  Understanding R1-Zero-Like Training (Liu et al., 2025), arXiv 2503.20783
  DAPO     DAPO: an open-source LLM RL system at scale (Yu et al., 2025), arXiv 2503.14476

What the method is
  No critic. For each prompt x sample a group of G responses, score them with the verifier, and use
  the group's own mean reward as the baseline:
      GRPO     A_i = (r_i - mean(r)) / (std(r) + eps)           -> group_advantages(scale_std=True)
      Dr.GRPO  A_i =  r_i - mean(r)                              -> group_advantages(scale_std=False)
  A_i is broadcast to every token of response i and plugged into the clipped surrogate
  (common.policy_loss). DAPO keeps GRPO's advantage and adds four changes:
      clip-higher       ratio clipped to [1 - 0.2, 1 + 0.28]      -> --eps-high 0.28
      token-mean loss   every token weighs the same               -> --loss-agg token-mean
      dynamic sampling  drop groups whose rewards are all equal   -> informative_groups, --dynamic-sampling
                        (A = 0: no signal), resample up to --max-resample times
      overlong shaping  linear penalty in the last L_cache tokens -> overlong_penalty, --overlong-buffer

Equation -> function
  group baseline and advantage ............ group_advantages
  DAPO soft overlong punishment ........... overlong_penalty
  DAPO dynamic-sampling filter ............ informative_groups
  clipped surrogate, aggregation, KL ...... common.policy_loss (shared by all methods)

Choices that are ours, not the papers'
  - std is the unbiased (ddof=1) group std, as in verl and TRL; eps = 1e-6 added to it, as verl (the
    papers give neither). A group of one would get A = 0 (see group_advantages): --group-size must be >= 2.
  - No preset has a KL term (--kl-coef 0): DAPO drops it, the GRPO paper keeps beta = 0.04 with k3 in the
    loss (--kl-coef 0.04 --kl-type k3 gives that).
  - dapo's --overlong-buffer 0.2 is DAPO's L_cache / L_max = 4096 / 20480, as a share of --max-new-tokens.
  - Dynamic sampling resamples only as many new prompts as groups are missing (DAPO samples whole
    generation batches); after --max-resample tries it trains on the informative groups it has.
  - --variant sets presets (VARIANTS), in Python (Args(variant="dapo")) as on the command line; a value
    given explicitly overrides its preset.
  - CPU defaults (lr 3e-5, 8 prompts x G=4, 48 tokens, temperature 0.7, one optimizer step per batch) are
    sized for smollm2-135m on 2 cores, not DAPO's 512 prompts x G=16, lr 1e-6, temperature 1, 16 mini-batch
    steps per batch.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

import common as C
from common import arg

# --preset paper (PAPERS.md): G 16, mini-batches of 32 prompts; 64 prompts a step, not 512 (one GPU, ours)
PRESET = C.presets(cpu=dict(group_size=4), paper=dict(group_size=16, minibatch_size=32 * 16))
VARIANTS = {  # --variant presets: each sets every field below whose default is None; explicit values win
    "grpo": dict(scale_std=True, loss_agg="seq-mean-token-mean", eps_high=0.2, dynamic_sampling=False, overlong_buffer=0.0),
    "drgrpo": dict(scale_std=False, loss_agg="seq-mean-token-sum-norm", eps_high=0.2, dynamic_sampling=False,
                   overlong_buffer=0.0),
    "dapo": dict(scale_std=True, loss_agg="token-mean", eps_high=0.28, dynamic_sampling=True, overlong_buffer=0.2),
}


@dataclass
class Args(C.TrainArgs):
    """GRPO / Dr.GRPO / DAPO: group-mean baselines, no critic."""
    out: str = arg("runs/grpo", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"variant": VARIANTS, "preset": PRESET}
    variant: str = arg("grpo", "preset: grpo (std-normalised, seq-mean-token-mean), drgrpo (no std, token sum / "
                       "max length), dapo (clip-higher 0.28, token-mean, dynamic sampling, overlong shaping)",
                       choices=list(VARIANTS))
    group_size: int | None = arg(None, "G: rollouts per prompt (default: set by --preset)")
    scale_std: bool | None = arg(None, "divide the advantage by the group std (GRPO) or not (Dr.GRPO); None: "
                                 "set by --variant")
    dynamic_sampling: bool | None = arg(None, "DAPO: drop zero-std groups and resample prompts to refill the batch; "
                                        "None: set by --variant")
    max_resample: int = arg(3, "DAPO: extra sampling rounds per step at most, before training on what is there")
    overlong_buffer: float | None = arg(None, "DAPO: L_cache as a fraction of --max-new-tokens (0: off); None: set "
                                        "by --variant")
    eps_high: float | None = arg(None, "PPO clip: ratio upper bound 1 + eps_high (DAPO clip-higher: 0.28); None: set "
                                 "by --variant")
    loss_agg: str | None = arg(None, "loss aggregation over tokens; None: set by --variant",
                               choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:  # a group of one is its own baseline: A = 0 for every rollout
            raise ValueError(f"--group-size must be >= 2 (a group of one has A = r - mean(r) = 0: nothing "
                             f"to learn, with or without --dynamic-sampling), got {self.group_size}")
        if self.max_resample < 0:
            raise ValueError(f"--max-resample must be >= 0, got {self.max_resample}")
        if not 0 <= self.overlong_buffer < 1 or 0 < self.overlong_buffer * self.max_new_tokens < 1:
            raise ValueError(f"--overlong-buffer must be 0 (off) or a fraction in (0, 1) of --max-new-tokens "
                             f"that is at least one token, got {self.overlong_buffer}")


# ------------------------------------------------------------------------------------------------
# The method's own math
# ------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards: [N, G] (N prompts, G rollouts each) -> advantages [N, G].
    GRPO:    A_i = (r_i - mean_g r) / (std_g r + eps)   std with ddof 1 (verl, TRL); eps added to the std,
                                                       1e-6 as verl (TRL: 1e-4)
    Dr.GRPO: A_i = r_i - mean_g r
    A group whose rewards are all equal gets A = 0. So does a group of one (its mean is its own reward), as
    in TRL; verl's compute_grpo_outcome_advantage gives a singleton mean 0 and std 1, so A = r / (1 + eps)."""
    adv = rewards - rewards.mean(-1, keepdim=True)
    if scale_std:
        std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    return adv


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward:
        0                                 if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max   (from 0 down to -1)
    lengths: [B] -> [B]."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_len - buffer
    return ((start - lengths.float()) / buffer).clamp(-1.0, 0.0)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N] bool: the group's rewards are not all equal, so its advantages are not all 0."""
    return rewards.max(-1).values > rewards.min(-1).values


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


@dataclass
class Groups:
    """G rollouts of each problem, scored: rollouts grouped by problem; correct and lengths [N, G]."""
    problems: list
    rollouts: list
    correct: torch.Tensor
    lengths: torch.Tensor
    no_answer: int

    def select(self, keep: torch.Tensor) -> "Groups":
        """The groups where keep [N] is True (no_answer still counts every completion that was scored). On a
        sample_groups result only: a rollout's prompt_idx indexes the problems it was sampled with."""
        idx = keep.nonzero()[:, 0].tolist()
        return Groups([self.problems[i] for i in idx], [r for r in self.rollouts if keep[r.prompt_idx]],
                      self.correct[idx], self.lengths[idx], self.no_answer)

    @staticmethod
    def cat(parts: list["Groups"]) -> "Groups":
        return Groups([p for g in parts for p in g.problems], [r for g in parts for r in g.rollouts],
                      torch.cat([g.correct for g in parts]), torch.cat([g.lengths for g in parts]),
                      sum(g.no_answer for g in parts))


def sample_groups(sampler, tok, problems, G, args, seed) -> Groups:
    """Generate G rollouts per problem and score them."""
    rollouts, correct, no_answer = C.rollouts_scored(sampler, tok, problems, G, args, seed)
    N = len(problems)
    lengths = torch.tensor([len(r.ids) for r in rollouts]).view(N, G)
    return Groups(problems, rollouts, torch.tensor(correct).view(N, G), lengths, no_answer)


def main(args: Args):
    C.start_run(args, "grpo", args.steps)  # OUT/config.json; refuses a mismatched --resume
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    optimizer = C.adamw(policy.parameters(), args.lr)
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    start = 0
    # pi_ref is the initial policy: copied before --resume loads the checkpoint into `policy`
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if args.kl_coef > 0 else None
    if args.resume:
        state = C.load_checkpoint(args.out, {"policy": (policy, optimizer)})
        start, stream.cursor = state["step"], state["extra"]["cursor"]
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set)
    logger = C.RunLogger(args.out, start, args.report_to)
    G, P = args.group_size, args.prompts_per_step
    buffer = int(args.overlong_buffer * args.max_new_tokens)

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="grpo", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> G rollouts each -> verifiable rewards (DAPO: keep resampling until the batch is full)
        drawn, kept = [], []  # every sampled batch of groups; the groups that train
        with timer("time_gen"):
            for attempt in range(1 + (args.max_resample if args.dynamic_sampling else 0)):
                need = P - sum(len(g.problems) for g in kept)
                if need <= 0:
                    break
                groups = sample_groups(sampler, tok, stream.take(need), G, args,
                                       seed=C.rollout_seed(args.seed, step, attempt))
                drawn.append(groups)
                kept.append(groups.select(informative_groups(groups.correct)) if args.dynamic_sampling else groups)
        spent, train = Groups.cat(drawn), Groups.cat(kept)
        problems, rollouts, correct, lengths = train.problems, train.rollouts, train.correct, train.lengths  # [N, G]

        # 2. the method: shaped reward, group baseline, advantage broadcast over tokens
        rewards = correct + overlong_penalty(lengths.flatten(), args.max_new_tokens, buffer).view_as(correct)
        adv = group_advantages(rewards, args.scale_std)  # [N, G]
        metrics = {"reward": rewards.mean().item() if len(problems) else float("nan"),
                   "acc": correct.mean().item() if len(problems) else float("nan"),
                   **C.batch_metrics(correct.tolist(), adv.flatten(), rollouts, spent.no_answer),
                   # what the step spent, dynamic sampling's discarded groups included
                   "frac_reward_zero_std": (~informative_groups(spent.correct)).float().mean().item(),
                   "rollouts": len(spent.rollouts), "tokens": int(spent.lengths.sum()), "groups": len(problems)}
        if args.oracle_k > 0 and len(problems):  # diagnostic only: the group mean vs a Monte-Carlo p(x)
            metrics.update(C.oracle_baseline_mse(sampler, tok, problems, correct.mean(-1).numpy(), args,
                                                 seed=C.second_seed(args.seed, step)))

        # 3. policy update with the clipped surrogate
        sampler.sleep()  # GPU: the engine frees its memory for the update (--vllm-sleep)
        with timer("time_train"):
            if len(problems):
                batch = C.collate(rollouts, tok.pad_token_id, dev)
                adv_tok = adv.flatten()[:, None].to(dev) * batch["response_mask"]  # [B, L]
                ref_logp = None if ref is None else C.logprobs_no_grad(ref, batch, args.temperature, args.logp_chunk,
                                                                         args.micro_batch_size)
                metrics.update(C.policy_update(policy, optimizer, batch, adv_tok, args, ref_logp=ref_logp))
                sampler.sync_weights(policy)

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, {"policy": (policy, optimizer)}, {"cursor": stream.cursor},
                              keep=args.keep_checkpoints)
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(Args))
