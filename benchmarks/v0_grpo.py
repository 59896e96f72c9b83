"""GRPO with the rollout budget allocated by V0, against uniform allocation and DAPO dynamic sampling.

    python benchmarks/v0_grpo.py --alloc v0        # the committed V0 decides where the rollouts go
    python benchmarks/v0_grpo.py --alloc uniform   # group_size rollouts to each of prompts_per_step prompts
    python benchmarks/v0_grpo.py --alloc dynamic   # uniform, then resample the groups whose rewards are all equal

One step with --alloc v0: V0 (v0.py) reads the policy's last --history (prompt, success rate) rows in context and
predicts p for candidates * prompts_per_step prompts; v0.allocate_budget spends prompts_per_step * group_size
rollouts on them, in groups of min_group to max_group (a prompt predicted near 0 or 1 is usually skipped). The
groups then differ in size; each gets GRPO's group baseline (grpo.group_advantages, one group at a time), and the
policy update is common.policy_update as in grpo.py. Each group's observed success rate joins the history.
Metrics besides every method's: groups, wasted_rollout_frac (share of rollouts in zero-advantage groups),
rollouts_per_useful_group, v0_pred_mse and v0_auc (V0's p against the groups' observed rates), time_v0, no_answer.

Choices that are ours (the authors' code has no allocation rule)
  - The rule: v0.allocate_budget (greedy on expected informative groups per rollout).
  - V0's context is the policy's last --history rows, started from the base policy's collected rows shipped with
    the checkpoint (--history-init auto); with no history at all, every candidate is predicted 0.5.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import grpo  # noqa: E402
import v0 as V0  # noqa: E402
from common import arg  # noqa: E402


@dataclass
class Group:
    """One prompt's rollouts and their rewards; under V0's allocation groups differ in size."""
    problem: C.Problem
    rollouts: list  # [n] common.Rollout
    rewards: torch.Tensor  # [n], 1.0 = correct


def advantages_per_group(groups: list[Group], scale_std: bool = True) -> torch.Tensor:
    """GRPO's A_i = (r_i - mean_g r) / (std_g r + eps) on groups of different sizes: grpo.group_advantages on each
    group, concatenated in order. -> [sum of group sizes]"""
    return torch.cat([grpo.group_advantages(g.rewards.float()[None], scale_std)[0] for g in groups])


@dataclass
class GrpoArgs(C.TrainArgs):
    """GRPO where V0 predicts each candidate prompt's success rate from the policy's own history and
    allocates a fixed rollout budget (or: uniform allocation, or DAPO dynamic sampling, for comparison)."""
    out: str = arg("runs/v0_grpo", "run folder: metrics.jsonl, checkpoints")
    alloc: str = arg("v0", "v0: V0 allocates prompts_per_step * group_size rollouts over candidates; uniform: "
                     "group_size each to prompts_per_step prompts; dynamic: uniform, then resample zero-std groups "
                     "(DAPO)", choices=["v0", "uniform", "dynamic"])
    group_size: int = arg(4, "G; the budget per step is prompts_per_step * G rollouts")
    candidates: int = arg(3, "v0: V0 scores candidates * prompts_per_step prompts per step")
    min_group: int = arg(4, "v0: smallest group it opens")
    max_group: int = arg(8, "v0: largest group")
    v0: str = arg(V0.PRETRAINED, "V0 checkpoint (make one with `benchmarks/v0_collect.py`, then `v0.py`)")
    history: int = arg(64, "v0: the policy's most recent (prompt, success rate) rows V0 reads as context")
    history_init: str = arg("auto", "v0: rows to start the history from: auto (the checkpoint's own "
                            "context.jsonl, collected from the base policy), a rows .jsonl (with prompt_dict.json "
                            "beside it), or none")
    max_resample: int = arg(3, "dynamic: extra sampling rounds per step at most")
    scale_std: bool = arg(True, "divide advantages by the group std (GRPO)")

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.min_group <= self.max_group:
            raise ValueError(f"need 2 <= --min-group <= --max-group (a group of one has no spread), got "
                             f"{self.min_group}, {self.max_group}")
        if self.alloc != "v0" and self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (a group of one has zero advantage), got {self.group_size}")
        if self.alloc == "v0" and self.prompts_per_step * self.group_size < self.min_group:
            raise ValueError(f"--min-group must fit the budget --prompts-per-step x --group-size, got {self.min_group}")
        if self.candidates < 1 or self.history < 1:
            raise ValueError(f"--candidates and --history must be >= 1, got {self.candidates}, {self.history}")


def main(args: GrpoArgs):
    C.start_run(args, "v0_grpo", args.steps)
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    optimizer = C.adamw(policy.parameters(), args.lr)
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    v0_model, backbone = V0.load_v0(args.v0) if args.alloc == "v0" else (None, None)
    history = V0.initial_history(args.v0, args.history_init, args.history) if args.alloc == "v0" else []  # newest last
    start = 0
    if args.resume:
        state = C.load_checkpoint(args.out, {"policy": (policy, optimizer)})
        start, stream.cursor, history = state["step"], state["extra"]["cursor"], state["extra"]["history"]
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set)
    logger = C.RunLogger(args.out, start, args.report_to)
    P, G = args.prompts_per_step, args.group_size
    budget = P * G
    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc=f"v0-grpo[{args.alloc}]", initial=start, total=args.steps):
        timer, t0, metrics = C.Timer(), time.perf_counter(), {}
        # 1. where do the rollouts go? V0: predict p for candidates, allocate; uniform / dynamic: G each
        with timer("time_v0"):
            if args.alloc == "v0":
                candidates = stream.take(args.candidates * P)
                p_hat = (V0.predict(v0_model, backbone, [text for text, _ in history], [rate for _, rate in history],
                                    [c.question for c in candidates])
                         if history else np.full(len(candidates), 0.5))  # no history yet: every prompt looks alike
                n = V0.allocate_budget(p_hat, budget, args.min_group, args.max_group)
                keep = np.nonzero(n)[0]
                problems, group_sizes, p_hat = [candidates[i] for i in keep], n[keep].tolist(), p_hat[keep]
            else:
                problems, group_sizes, p_hat = stream.take(P), [G] * P, None
        # 2. rollouts and rewards (dynamic: resample prompts whose group came back all-equal)
        groups: list[Group] = []
        with timer("time_gen"):
            for attempt in range(1 + (args.max_resample if args.alloc == "dynamic" else 0)):
                sampled = sampler.generate([C.build_prompt(tok, p) for p in problems], group_sizes, args.max_new_tokens,
                                           args.temperature, seed=C.rollout_seed(args.seed, step, attempt))
                correct, no_answer = C.score([r.text for r in sampled], [problems[r.prompt_idx].answer for r in sampled])
                metrics["no_answer"] = metrics.get("no_answer", 0) + no_answer
                for i, problem in enumerate(problems):
                    mine = [k for k, r in enumerate(sampled) if r.prompt_idx == i]
                    groups.append(Group(problem, [sampled[k] for k in mine], torch.tensor([correct[k] for k in mine])))
                missing = P - sum(float(g.rewards.max() > g.rewards.min()) for g in groups)
                if args.alloc != "dynamic" or missing <= 0:
                    break
                problems, group_sizes = stream.take(int(missing)), [G] * int(missing)
        zero_spread = [float(g.rewards.max() == g.rewards.min()) for g in groups]
        sizes = [len(g.rewards) for g in groups]
        rates = np.array([g.rewards.float().mean().item() for g in groups])
        history = (history + [(g.problem.question, float(r)) for g, r in zip(groups, rates)])[-args.history:]
        if p_hat is not None:
            metrics.update(v0_pred_mse=float(np.mean((p_hat - rates) ** 2)), v0_auc=C.roc_auc(p_hat, rates >= 0.5))

        # 3. GRPO on every group (zero-std groups have zero advantage and add nothing to the gradient)
        rollouts = [r for g in groups for r in g.rollouts]
        rewards = torch.cat([g.rewards for g in groups]).float()
        adv = advantages_per_group(groups, args.scale_std)
        informative = len(groups) - int(sum(zero_spread))
        metrics.update(C.batch_metrics([g.rewards.tolist() for g in groups], adv, rollouts, metrics["no_answer"]))
        metrics.update(reward=rewards.mean().item(), acc=rewards.mean().item(),
                       frac_reward_zero_std=float(np.mean(zero_spread)), groups=len(groups),
                       wasted_rollout_frac=float(sum(s for s, z in zip(sizes, zero_spread) if z) / len(rollouts)),
                       rollouts_per_useful_group=len(rollouts) / informative if informative else float("nan"))
        if args.oracle_k > 0:  # diagnostic only: each group's mean, its GRPO baseline, vs a Monte-Carlo p(x)
            metrics.update(C.oracle_baseline_mse(sampler, tok, [g.problem for g in groups], rates, args,
                                                 seed=C.second_seed(args.seed, step)))
        sampler.sleep()  # GPU: the engine frees its memory for the update (--vllm-sleep)
        with timer("time_train"):
            batch = C.collate(rollouts, tok.pad_token_id, dev)
            adv_tok = adv[:, None].to(dev) * batch["response_mask"]  # [B, L]
            metrics.update(C.policy_update(policy, optimizer, batch, adv_tok, args))
            sampler.sync_weights(policy)

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, {"policy": (policy, optimizer)},
                              {"cursor": stream.cursor, "history": history}, keep=args.keep_checkpoints)
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(GrpoArgs))
