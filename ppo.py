"""PPO with a learned critic: the value-based baseline the cheaper methods are measured against.

Papers
  PPO          Proximal Policy Optimization Algorithms (Schulman et al., 2017), arXiv 1707.06347
  GAE          High-Dimensional Continuous Control Using Generalized Advantage Estimation
               (Schulman et al., 2015), arXiv 1506.02438
  For LLMs     Ouyang et al. 2022 (arXiv 2203.02155); "The N implementation details of RLHF with PPO"
               (Huang et al., 2024); verl's and OpenRLHF's PPO trainers.

What the method is
  A critic V_phi(s_t), a language model with a scalar head (ValueModel), predicts the expected
  final reward from every prefix s_t = (x, y_<t). The verifier's reward r sits on the last response
  token; optionally each token also pays -beta * (log pi - log pi_ref) (KL in the reward, not the loss).
      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
      A_t     = sum_l (gamma * lambda)^l delta_{t+l}      (GAE)        -> gae
      R_t     = A_t + V(s_t)                               (critic target)
      A_t     <- whiten(A_t) over the batch's real tokens                -> common.masked_whiten
  The policy takes the clipped surrogate on A_t (common.policy_loss); the critic regresses V onto R_t
  with the clipped value loss (value_loss). During the first --critic-warmup steps only the
  critic trains, so the policy never follows a critic that has not seen a reward yet.
  The cost that every other method here exists to cut: the critic is a second network as large as the
  policy (by default a copy of it), with its own forward, backward and AdamW moments every step.

Equation -> function
  per-token rewards (terminal score, KL penalty) .... token_rewards
  GAE, returns ...................................... gae
  whitening ......................................... common.masked_whiten
  clipped value loss / update ....................... value_loss, value_update
  explained variance ................................ explained_variance
  clipped surrogate / update ........................ common.policy_loss, common.policy_update
  Shared with dvpo.py and genac.py (PPO with another critic): second_model, kl_logprobs, advantage_metrics.

Choices that are ours (the PPO paper has no LLM setting; verl's defaults named where ours differ)
  - lambda 0.95 and value clip 0.2, as TRL's former PPO trainer and Huang et al.'s code; verl's defaults
    are lambda 1 and value clip 0.5. Advantages whitened with the 1/n variance (verl, TRL: 1/(n-1);
    common.masked_whiten). The critic's head starts at zero (ValueModel).
  - baseline_mse uses the critic's value at the first response token, V(s_0), as the prompt's baseline:
    with gamma = 1 and a 0/1 reward it estimates the success rate p(x).
  - CPU defaults: 32 prompts x 1 rollout (the same 32 rollouts per step as grpo.py's 8 x 4), critic lr
    1e-4 (~3x the actor's 3e-5; verl's default is 10x: 1e-5 vs 1e-6), 1 warm-up step (verl: 0).
  - frac_reward_zero_std is null when --group-size is 1 (a group of one has no spread to measure).
"""
from __future__ import annotations

import copy
import time
from typing import ClassVar
from dataclasses import dataclass

import torch

import common as C
from common import arg


# --preset paper (ours, sized to one 80 GB GPU, docs/gpu.md): a 4B policy's float32 weights and AdamW states
# (64 GB) leave no room for a critic, so Qwen3-1.7B learns beside a Qwen3-0.6B critic (same tokenizer)
PRESET = C.presets(cpu=dict(steps=15, prompts_per_step=32, critic_model="", critic_lr=1e-4),
                   paper=dict(model="Qwen3-1.7B", critic_model="Qwen3-0.6B", critic_lr=1e-5, prompts_per_step=128,
                              micro_batch_size=1))


@dataclass
class Args(C.TrainArgs):
    """PPO: learned critic (value head), GAE, clipped policy and value losses."""
    out: str = arg("runs/ppo", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"preset": PRESET}
    group_size: int = arg(1, "rollouts per prompt (PPO needs no groups; raise it to compare with GRPO)")
    gamma: float = arg(1.0, "discount gamma")
    lam: float = arg(0.95, "GAE lambda")
    critic_model: str | None = arg(None, "critic backbone: '' copies the policy (the usual, costly choice); or a "
                                   "smaller model with the same tokenizer, as --model (default: set by --preset)")
    critic_lr: float | None = arg(None, "critic AdamW learning rate (default: set by --preset)")
    value_clip: float = arg(0.2, "value-loss clip range c (0: plain squared error)")
    critic_warmup: int = arg(1, "first steps in which only the critic trains")
    whiten_adv: bool = arg(True, "whiten advantages over the batch's real tokens")

    def __post_init__(self):
        super().__post_init__()
        C.check_ranges(self, gamma=(0, 1), lam=(0, 1), group_size=(1, None), value_clip=(0, None),
                     critic_warmup=(0, None))


# -------------------- PPO's math: token rewards, GAE, the critic, its loss ------------------------


def token_rewards(score: torch.Tensor, mask: torch.Tensor, logp=None, ref_logp=None, beta: float = 0.0):
    """Per-token rewards [B, L]: the verifier's score on the last real token of each response (verl's reward
    managers put it at valid_response_length - 1 too), and, when beta > 0, the KL penalty
    -beta * (log pi(y_t) - log pi_ref(y_t)) on every real token (k1, as in PPO-RLHF)."""
    last = mask.sum(-1).long().clamp(min=1) - 1  # [B] index of the last real token
    r = torch.zeros_like(mask)
    r[torch.arange(len(score)), last] = score.to(r.dtype)
    if beta > 0:
        r = r - beta * (logp - ref_logp) * mask
    return r


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded token sequences ([B, L] each).
        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V
    Padding positions get A = 0 and returns 0 and do not leak into real tokens. On real tokens this is verl's
    compute_gae_advantage_return; verl's returns on padding are V, and it whitens A inside (here
    masked_whiten, a separate step the caller chooses)."""
    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    next_v, next_a = torch.zeros(B, device=rewards.device), torch.zeros(B, device=rewards.device)
    for t in reversed(range(L)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = a * m
        next_v = torch.where(m > 0, values[:, t], next_v)  # padding carries nothing backwards
        next_a = torch.where(m > 0, a, next_a)
    return adv, (adv + values) * mask


class ValueModel(torch.nn.Module):
    """A language model's decoder + a scalar head: V(s_t) for every position. Ours: the head starts at zero,
    so the first values are 0 and the first step moves only the head (a zero head passes no gradient to the
    decoder); verl's critic is a token-classification head with transformers' default random init, DVPO's
    code uses TRL's value-head model."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.get_decoder()
        self.config = lm.config
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, dtype=next(lm.parameters()).dtype,
                                    device=next(lm.parameters()).device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict, all_positions: bool = False):
        """Values of the states before each response token and after the last: [B, L]; all_positions: the head on
        every position of [prompt | response], [B, P+L] (dvpo.py's official whitening counts them all)."""
        h = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).last_hidden_state
        if not all_positions:
            P, L = batch["prompt_len"], batch["response_ids"].shape[1]
            h = h[:, P - 1:P + L - 1]
        return self.head(h).squeeze(-1).float()


def critic_values(critic, batch, micro: int) -> torch.Tensor:
    """V(s_t) for every response token, no gradient: [B, L]."""
    with torch.no_grad():
        B = batch["response_ids"].shape[0]
        return torch.cat([critic(C.slice_batch(batch, slice(s, s + micro))) for s in range(0, B, micro)])


def value_loss(v, v_old, returns, mask, clip: float = 0.2):
    """Clipped value loss (PPO, as in verl / OpenAI's RLHF code), masked token mean:
        0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2);   c <= 0: 0.5 * (V - R)^2
    Equal to verl's compute_value_loss (token-mean) for c > 0; there c = 0 would keep the max with
    (V_old - R)^2, here it means no clipping."""
    loss = (v - returns) ** 2
    if clip > 0:
        loss = torch.maximum(loss, (v_old + (v - v_old).clamp(-clip, clip) - returns) ** 2)
    return 0.5 * C.masked_mean(loss, mask)


def value_update(critic, optimizer, batch: dict, returns, old_values, args, clip: float = 0.2) -> dict:
    """Regress the critic's V(s_t) [B, L] onto `returns` (see minibatch_update, value_loss)."""
    mask = batch["response_mask"]

    def loss_fn(r):
        loss = value_loss(critic(C.slice_batch(batch, r)), old_values[r], returns[r], mask[r], clip)
        return loss, {"value_loss": loss.item()}
    with C.update_mode(critic, args.grad_checkpointing, args.autocast):
        st = C.minibatch_update(optimizer, mask, args, loss_fn, "token-mean")
    return {"value_loss": st.get("value_loss", float("nan")), "critic_grad_norm": st.get("grad_norm", float("nan")),
            "critic_nan_skips": st["nan_skips"]}


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over real tokens: 1 is a perfect critic, 0 no better than a constant.
    NaN when the returns are constant; verl's vf_explained_var adds 1e-5 to Var(R) instead (its ddof 1 in
    both variances cancels)."""
    var_r = C.masked_mean((returns - C.masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = C.masked_mean((err - C.masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 0 else float("nan")


def fit_critic(critic, optimizer, batch: dict, scores, args, epochs: int, log=None):
    """Train a critic on fixed rollouts (the policy frozen): each pass recomputes V, ppo.py's targets
    (GAE returns of the terminal scores [B]) and takes value_update. For studies of the critic alone."""
    mask = batch["response_mask"]
    for epoch in range(epochs):
        values = critic_values(critic, batch, args.micro_batch_size)  # [B, L]
        _, returns = gae(token_rewards(scores, mask), values, mask, args.gamma, args.lam)
        stats = value_update(critic, optimizer, batch, returns, values, args, args.value_clip)
        if log is not None:
            log(epoch, stats)


# -------------------- A second model beside the policy: shared with dvpo.py and genac.py ----------


def second_model(name: str, policy, tok, path: str, device, dtype, flag: str):
    """The backbone of a second network (critic, GVM) and its folder: `name` loaded, which must read the policy's token
    ids (the error names `flag`), or for name '' a trainable copy of the policy at `path` (same weights, separate
    parameters: twice the model memory)."""
    if not name:
        return copy.deepcopy(policy).requires_grad_(True), path
    lm, other_tok, folder = C.load_model(name, device, dtype)
    if other_tok.get_vocab() != tok.get_vocab():
        raise SystemExit(f"{flag} {name}: its tokenizer differs from the policy's; it must read the same token ids")
    return lm, folder


def kl_logprobs(policy, ref, batch: dict, args):
    """log pi and log pi_ref of the sampled tokens ([B, L] each) that a KL reward needs; (None, None) without pi_ref."""
    if ref is None:
        return None, None
    mbs = args.micro_batch_size
    return (C.logprobs_no_grad(policy, batch, args.temperature, args.logp_chunk, mbs),
            C.logprobs_no_grad(ref, batch, args.temperature, args.logp_chunk, mbs))


def advantage_metrics(correct, adv, mask, rollouts: list[C.Rollout], no_answer: int, G: int) -> dict:
    """common.batch_metrics on each rollout's mean token advantage, and the token advantages' spread adv_token_std."""
    rollout_adv = C.masked_mean(adv, mask, -1)  # [B]: a rollout's mean token advantage
    return {**C.batch_metrics(torch.as_tensor(correct).view(-1, G).tolist(), rollout_adv, rollouts, no_answer),
            "adv_token_std": C.masked_mean((adv - C.masked_mean(adv, mask)) ** 2, mask).sqrt().item()}


def main(args: Args):
    C.start_run(args, "ppo", args.steps)  # OUT/config.json; refuses a mismatched --resume
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    critic_lm, _ = second_model(args.critic_model, policy, tok, path, dev, dtype, "--critic-model")
    critic = ValueModel(critic_lm)
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
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set,
                            others={"critic": (critic.config, True)})  # the plan counts the critic's memory
    logger = C.RunLogger(args.out, start, args.report_to)
    G, P, mbs = args.group_size, args.prompts_per_step, args.micro_batch_size

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="ppo", initial=start, total=args.steps):
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
            # 2. the method: critic values, per-token rewards, GAE, whitened advantages
            values = critic_values(critic, batch, mbs)  # [B, L]
            old_logp, ref_logp = kl_logprobs(policy, ref, batch, args)  # None, None without a KL penalty
            rewards = token_rewards(correct.to(dev), mask, old_logp, ref_logp, args.kl_coef)
            adv, returns = gae(rewards, values, mask, args.gamma, args.lam)
            metrics = {"reward": rewards.sum(-1).mean().item(), "acc": correct.mean().item(),
                       "explained_variance": explained_variance(values, returns, mask),
                       "value_mean": C.masked_mean(values, mask).item()}
            if args.whiten_adv:
                adv = C.masked_whiten(adv, mask)

            # 3. critic update every step; policy update after the warm-up
            metrics.update(value_update(critic, critic_opt, batch, returns, values, args, args.value_clip))
            if step > args.critic_warmup:
                # the KL is already in the reward: keep it out of the loss (ref_logp=None)
                metrics.update(C.policy_update(policy, optimizer, batch, adv, args, old_logp=old_logp))
                sampler.sync_weights(policy)
            if ref is not None:  # the KL the reward paid (k1 of the sampled tokens), not the loss's (0 here)
                metrics["kl"] = C.masked_mean(old_logp - ref_logp, mask).item()

        metrics.update(advantage_metrics(correct, adv, mask, rollouts, no_answer, G))
        if args.oracle_k > 0:  # diagnostic only: the critic's V(s_0) vs a Monte-Carlo p(x)
            v0 = values[:, 0].view(P, G).mean(-1).cpu().numpy()  # same prompt, same state s_0
            metrics.update(C.oracle_baseline_mse(sampler, tok, problems, v0, args, seed=C.second_seed(args.seed, step)))

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, parts, {"cursor": stream.cursor}, keep=args.keep_checkpoints)
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(Args))
