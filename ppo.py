"""PPO with a learned critic: the value-based baseline the cheaper methods are measured against.

Papers
  PPO          Proximal Policy Optimization Algorithms (Schulman et al., 2017), arXiv 1707.06347
  GAE          High-Dimensional Continuous Control Using Generalized Advantage Estimation
               (Schulman et al., 2015), arXiv 1506.02438
  For LLMs     Ouyang et al. 2022 (arXiv 2203.02155); "The N implementation details of RLHF with PPO"
               (Huang et al., 2024); verl's and OpenRLHF's PPO trainers.

What the method is
  A critic V_phi(s_t), a language model with a scalar head (common.ValueModel), predicts the expected
  final reward from every prefix s_t = (x, y_<t). The verifier's reward r sits on the last response
  token; optionally each token also pays -beta * (log pi - log pi_ref) (KL in the reward, not the loss).
      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
      A_t     = sum_l (gamma * lambda)^l delta_{t+l}      (GAE)        -> common.gae
      R_t     = A_t + V(s_t)                               (critic target)
      A_t     <- whiten(A_t) over the batch's real tokens                -> common.masked_whiten
  The policy takes the clipped surrogate on A_t (common.policy_loss); the critic regresses V onto R_t
  with the clipped value loss (common.value_loss). During the first --critic-warmup steps only the
  critic trains, so the policy never follows a critic that has not seen a reward yet.
  The cost that every other method here exists to cut: the critic is a second network as large as the
  policy (by default a copy of it), with its own forward, backward and AdamW moments every step.

Equation -> function
  per-token rewards (terminal score, KL penalty) .... common.token_rewards
  GAE, returns ...................................... common.gae
  whitening ......................................... common.masked_whiten
  clipped value loss / update ....................... common.value_loss, common.value_update
  explained variance ................................ common.explained_variance
  clipped surrogate / update ........................ common.policy_loss, common.policy_update

Choices that are ours (the PPO paper has no LLM setting; verl's defaults named where ours differ)
  - lambda 0.95 and value clip 0.2, as TRL's former PPO trainer and Huang et al.'s code; verl's defaults
    are lambda 1 and value clip 0.5. Advantages whitened with the 1/n variance (verl, TRL: 1/(n-1);
    common.masked_whiten). The critic's head starts at zero (common.ValueModel).
  - baseline_mse uses the critic's value at the first response token, V(s_0), as the prompt's baseline:
    with gamma = 1 and a 0/1 reward it estimates the success rate p(x).
  - CPU defaults: 32 prompts x 1 rollout (the same 32 rollouts per step as grpo.py's 8 x 4), critic lr
    1e-4 (~3x the actor's 3e-5; verl's default is 10x: 1e-5 vs 1e-6), 1 warm-up step (verl: 0).
  - frac_reward_zero_std is null when --group-size is 1 (a group of one has no spread to measure).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

import common as C
from common import arg


@dataclass
class Args(C.TrainArgs):
    """PPO: learned critic (value head), GAE, clipped policy and value losses."""
    steps: int = arg(15, "policy updates (each on a fresh batch of rollouts)")
    prompts_per_step: int = arg(32, "prompts per step")
    group_size: int = arg(1, "rollouts per prompt (PPO needs no groups; raise it to compare with GRPO)")
    gamma: float = arg(1.0, "discount gamma")
    lam: float = arg(0.95, "GAE lambda")
    critic_model: str = arg("", "critic backbone: '' copies the policy (the usual, costly choice); or a smaller "
                            "model with the same tokenizer (name or folder, as --model)")
    critic_lr: float = arg(1e-4, "critic AdamW learning rate")
    value_clip: float = arg(0.2, "value-loss clip range c (0: plain squared error)")
    critic_warmup: int = arg(1, "first steps in which only the critic trains")
    whiten_adv: bool = arg(True, "whiten advantages over the batch's real tokens")

    def __post_init__(self):
        super().__post_init__()
        for name, low, high in (("gamma", 0, 1), ("lam", 0, 1), ("group_size", 1, None), ("value_clip", 0, None),
                                ("critic_warmup", 0, None)):
            v = getattr(self, name)
            if v < low or (high is not None and v > high):
                raise ValueError(f"--{C.flag(name)} must be {f'in [{low}, {high}]' if high else f'>= {low}'}, got {v}")


def main(args: Args):
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype)
    if args.critic_model:
        critic_lm, critic_tok, _ = C.load_model(args.critic_model, dev, dtype)
        if critic_tok.get_vocab() != tok.get_vocab():
            raise SystemExit(f"--critic-model {args.critic_model}: its tokenizer differs from the policy's; "
                             "the critic must read the same token ids")
    else:
        critic_lm = copy.deepcopy(policy)  # same weights, separate parameters: twice the model memory
    critic = C.ValueModel(critic_lm)
    optimizer = C.adamw(policy.parameters(), args.lr)
    critic_opt = C.adamw(critic.parameters(), args.critic_lr)
    parts = {"policy": (policy, optimizer), "critic": (critic, critic_opt)}
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    start = 0
    # pi_ref is the initial policy: copied before --resume loads the checkpoint into `policy`
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if args.kl_coef > 0 else None
    if args.resume:
        state = C.load_checkpoint(args.out, parts)
        start, stream.cursor = state["step"], state["extra"]["cursor"]
    sampler = C.make_sampler(args.sampler, policy, tok, path, dtype, args.seed)
    logger = C.RunLogger(args.out, resume_step=start)
    G, P, mbs = args.group_size, args.prompts_per_step, args.micro_batch_size

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="ppo", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> rollouts -> verifiable rewards
        with timer("time_gen"):
            probs = stream.take(P)
            roll = sampler.generate([C.build_prompt(tok, p) for p in probs], G, args.max_new_tokens,
                                    args.temperature, seed=args.seed * 1_000_003 + step * 101)
            correct, no_answer = C.score([r.text for r in roll], [probs[r.prompt_idx].answer for r in roll])
        correct = torch.tensor(correct)  # [B], B = P * G, grouped by prompt
        batch = C.collate(roll, tok.pad_token_id, dev)
        mask = batch["response_mask"]

        with timer("time_train"):
            # 2. the method: critic values, per-token rewards, GAE, whitened advantages
            values = C.critic_values(critic, batch, mbs)  # [B, L]
            old_logp = ref_logp = None
            if ref is not None:  # the KL penalty needs log pi and log pi_ref of the sampled tokens
                old_logp = C.logprobs_no_grad(policy, batch, args.temperature, args.logp_chunk, mbs)
                ref_logp = C.logprobs_no_grad(ref, batch, args.temperature, args.logp_chunk, mbs)
            rewards = C.token_rewards(correct.to(dev), mask, old_logp, ref_logp, args.kl_coef)
            adv, returns = C.gae(rewards, values, mask, args.gamma, args.lam)
            metrics = {"reward": rewards.sum(-1).mean().item(), "acc": correct.mean().item(),
                       "explained_variance": C.explained_variance(values, returns, mask),
                       "value_mean": C.masked_mean(values, mask).item()}
            if args.whiten_adv:
                adv = C.masked_whiten(adv, mask)

            # 3. critic update every step; policy update after the warm-up
            metrics.update(C.value_update(critic, critic_opt, batch, returns, values, args, args.value_clip))
            if step > args.critic_warmup:
                # the KL is already in the reward: keep it out of the loss (ref_logp=None)
                metrics.update(C.policy_update(policy, optimizer, batch, adv, args, old_logp=old_logp))
                sampler.sync_weights(policy)
            if ref is not None:  # the KL the reward paid (k1 of the sampled tokens), not the loss's (0 here)
                metrics["kl"] = C.masked_mean(old_logp - ref_logp, mask).item()

        flat = correct.view(P, G)
        metrics.update(adv_std=C.masked_mean((adv - C.masked_mean(adv, mask)) ** 2, mask).sqrt().item(),
                       frac_reward_zero_std=(flat.max(-1).values == flat.min(-1).values).float().mean().item()
                       if G > 1 else None,
                       rollouts=len(roll), tokens=int(mask.sum()), no_answer=no_answer,
                       resp_len=mask.sum(-1).mean().item())
        if args.oracle_k > 0:  # diagnostic only: the critic's V(s_0) vs a Monte-Carlo p(x)
            v0 = values[:, 0].view(P, G).mean(-1).cpu().numpy()  # same prompt, same state s_0
            metrics.update(C.oracle_baseline_mse(sampler, tok, probs, v0, args, seed=args.seed * 7_919 + step))

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, parts, {"cursor": stream.cursor})
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(Args))
