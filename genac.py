"""GenAC: a generative critic that reasons in text before it scores, with In-Context Conditioning.

Paper
  Bringing Value Models Back: Generative Critics for Value Modeling in LLM Reinforcement Learning (Shan,
  Zhong, Wang, Zhao), arXiv 2604.10701; the method is Generative Actor-Critic (GenAC). No official code found.

What the method is (the paper)
  PPO's critic maps a state s_t = (x, y_<t) to a scalar in one forward pass. GenAC's critic is a language model
  that keeps its LM head: prompted with the problem and the actor's partial response, it judges the problem's
  difficulty and the progress or errors so far, and ends with an integer k in 0..10 for the chance of success,
  read as the value v(s_t) = k / 10. In-Context Conditioning (ICC) instructs the critic to infer the actor's
  capability from its partial response and gives it facts about the actor (its identity and model size, a
  smoothed running average of its success rate), so one critic stays calibrated while the actor changes.
      1. SFT     (`genac.py sft`)      cross-entropy on reasoning traces (the paper's are an oracle model's)
      2. RL pre-training (`pretrain`) actor frozen; REINFORCE on the critic's own tokens with reward
                                       R_v = 1 - (r - v)^2  (r the rollout's verified outcome; 0 if malformed)
      3. joint   (`train`)             PPO on advantages from the critic's values; the critic keeps taking
                                       REINFORCE steps on R_v with the fresh outcomes

Third-party readings (PAPERS.md [3rd]), not the paper's
  - The answer is written `<answer>k</answer>`; ICC also states the tokens left in the actor's budget.
  - Stage 3's advantages: the critic is asked at segment boundaries b_0 = 0 < b_1 < ... < b_{K-1} = T-1 (every
    --segment tokens and the final token); with V_k = v(s_{b_k}), the verified reward r after the last token
    and V_K = 0, segment-level GAE (gamma 1, lambda 0.95 and whitening over the batch: ppo.py's defaults)
      delta_k = [k = K-1] r + gamma V_{k+1} - V_k,     A_k = delta_k + gamma lambda A_{k+1}
    and every token of segment k, [b_k, b_{k+1}), takes A_k.

Equation -> function
  the critic's prompt, with / without ICC ......... critic_prompt, icc_context
  k -> v = k / 10; R_v = 1 - (r - v)^2 ............ parse_value; critic_rewards
  boundaries, segment GAE, to tokens .............. segment_bounds, segment_gae, segment_advantages, rollout_advantages
  stage 1 targets ................................. monte_carlo_states, sft_trace (the rate in a template)
  querying the critic; REINFORCE on its tokens .... query_critic; critic_update (policy_update at ratio 1)

Choices that are ours, not the paper's
  - No oracle model is available offline, so stage 1's traces are honest templates, not reasoning: the
    "difficulty" word is read off the measured rate, "progress" off the partial text (a boxed answer or not),
    and the integer is round(10 * p_MC), p_MC measured from the actor's own samples (monte_carlo_states).
  - Only an integer 0..10 is an answer (" 4 " and "07" read as 4 and 7); "11", "-1", "4.5" are unparsable,
    not clamped as the third-party reading does (an answer outside the paper's range earns nothing, not the
    value of its nearest end); several tags must hold the same integer (hedging earns nothing). Unparsable:
    the value is the ICC running mean (PAPERS.md's fallback), the reward 0, counted in critic_parse_fail.
  - The critic starts as a copy of the actor unless --critic names one. One critic sample per state is GAE's value
    and REINFORCE's sample, with the step's mean R_v as baseline (the paper names none), on --critic-batch answers.
  - The "final token" boundary is the state before the last response token, b = T-1; the state after it is
    terminal (value 0, reward r), so a critic that reads a finished answer acts as a verifier.
  - The running success rate is an EMA of each batch's accuracy (--icc-ema), carried by the critic's checkpoint
    into the next stage, 0.5 for a critic that has none. Model size is counted from the actor's parameters.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import common as C
import ppo
from common import arg


# --preset paper (ours, sized to one 80 GB GPU, docs/gpu.md): Qwen3-1.7B with a Qwen3-0.6B critic that reasons for up to
# 256 tokens every 1024 response tokens (the paper's model sizes and budgets differ)
PRESET = C.presets(cpu=dict(steps=12, prompts_per_step=16, critic="", segment=24, critic_max_tokens=32),
                   paper=dict(model="Qwen3-1.7B", critic="Qwen3-0.6B", prompts_per_step=64, segment=1024,
                              critic_max_tokens=256, micro_batch_size=1))


@dataclass
class Args(C.TrainArgs):
    """GenAC: PPO whose critic is a language model that reasons, then scores 0..10, with In-Context Conditioning."""
    out: str = arg("runs/genac", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"preset": PRESET}
    group_size: int = arg(1, "rollouts per prompt (GenAC needs no groups)")
    critic: str | None = arg(None, "the critic to start from: a model folder (a stage's OUT/ckpt/critic) or name, '' a "
                             "copy of --model; with no subcommand, the previous stage's (default: set by --preset)")
    segment: int | None = arg(None, "query the critic every N response tokens, and before the final token (default: "
                              "set by --preset)")
    critic_max_tokens: int | None = arg(None, "the critic's output length limit in tokens (default: set by --preset)")
    critic_temperature: float = arg(0.7, "the critic's sampling temperature")
    critic_lr: float = arg(2e-5, "critic AdamW learning rate (stages 2 and 3)")
    critic_batch: int = arg(16, "critic answers per REINFORCE step, drawn at random from the step's (0: all)")
    icc: bool = arg(True, "In-Context Conditioning: the instruction to infer the actor's capability, its name and "
                    "size, running success rate, tokens left (--no-icc: the ablation; same setting in every stage)")
    icc_ema: float = arg(0.9, "smoothing a of the running success rate: ema <- a * ema + (1 - a) * batch accuracy")
    gamma: float = arg(1.0, "discount per segment")
    lam: float = arg(0.95, "segment-level GAE lambda")
    whiten_adv: bool = arg(True, "whiten the actor's advantages over the batch's real tokens")
    # stage 1 and 2
    sft_problems: int = arg(16, "stage 1: problems of --data to collect traces on")
    sft_n: int = arg(4, "stage 1: rollouts per problem")
    sft_continuations: int = arg(1, "stage 1: extra rollouts from each mid-response state's prefix")
    sft_epochs: int = arg(1, "stage 1: passes over the traces")
    sft_lr: float = arg(1e-4, "stage 1: critic AdamW learning rate")
    pretrain_steps: int = arg(3, "stage 2: REINFORCE steps of the critic with the actor frozen")

    def __post_init__(self):
        super().__post_init__()
        C.check_ranges(self, group_size=(1, None), segment=(1, None), critic_max_tokens=(1, None),
                       critic_batch=(0, None), icc_ema=(0, 1), gamma=(0, 1), lam=(0, 1), sft_problems=(1, None),
                       sft_n=(1, None), sft_continuations=(0, None))
        if self.critic_temperature <= 0:
            raise ValueError(f"--critic-temperature must be > 0 (it samples), got {self.critic_temperature}")


# -------------------- The critic's interface: prompt, parse, reward (pure functions) --------------

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)  # the third-party format around the paper's integer


def icc_context(name: str, n_params: int, rate: float, left: int) -> str:
    """The ICC line: the paper's instruction and facts about the actor, and (third-party) the tokens left to it."""
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{round(n_params / 1e6)}M"
    return (f"Infer how capable the actor is from its response so far and these facts. The actor is {name} "
            f"({size} parameters). Its recent success rate is {round(100 * rate)}%. It has {left} tokens left.")


def critic_prompt(question: str, partial: str, icc: str | None) -> str:
    """The user message the critic answers (the chat template goes around it); icc: icc_context's line or None."""
    lines = ["An actor model is solving the problem below. Estimate the chance that it ends with the correct answer."]
    if icc:
        lines.append(icc)
    lines += [f"Problem: {question}", f"Actor's response so far: {partial.strip() or '(nothing yet)'}",
              "Judge the problem's difficulty, check the response for progress or errors, then give the chance "
              "of success as an integer k from 0 to 10, written <answer>k</answer>."]
    return "\n".join(lines)


def parse_value(text: str) -> float | None:
    """'... <answer>7</answer>' -> v = k / 10 = 0.7; None (unparsable) unless every tag holds the same k in 0..10."""
    ks = {int(k) if re.fullmatch(r"[0-9]+", k := raw.strip()) and int(k) <= 10 else None
          for raw in ANSWER.findall(text)}  # None marks a tag that holds no integer 0..10
    return ks.pop() / 10 if len(ks) == 1 and None not in ks else None


def critic_rewards(r: torch.Tensor, v: torch.Tensor, parsed: torch.Tensor) -> torch.Tensor:
    """R_v = 1 - (r - v)^2 per answer [N] (r verified, in {0, 1}); 0 where malformed (v is only the fallback)."""
    return torch.where(parsed, 1 - (r - v) ** 2, 0.0)


def sft_trace(p: float, partial: str) -> str:
    """A stage 1 target: a template rationale (ours; no oracle model offline) ending in round(10 p)."""
    difficulty = "easy" if p >= 0.7 else "moderate" if p >= 0.3 else "hard"
    progress = ("a boxed answer is written" if "\\boxed" in partial else "work has started" if partial.strip()
                else "nothing is written yet")
    return f"Difficulty: {difficulty} for this actor. Progress: {progress}. <answer>{round(10 * p)}</answer>"


# -------------------- Segment-level credit assignment (pure functions) ----------------------------


def segment_bounds(T: int, segment: int) -> list[int]:
    """Positions b (states s_b = x + y_<b) where the critic is asked: 0, N, 2N, ... below T-1, and T-1."""
    return sorted(set(range(0, max(T - 1, 0), segment)) | {max(T - 1, 0)})


def segment_gae(values: list[float], r: float, gamma: float = 1.0, lam: float = 0.95) -> list[float]:
    """V_0..V_{K-1} at the boundaries, terminal reward r -> A_0..A_{K-1}: ppo.gae with a segment as the step."""
    v = torch.tensor([values], dtype=torch.float64)  # [1, K]; float64 as the values' Python floats
    mask = torch.ones_like(v)
    adv, _ = ppo.gae(ppo.token_rewards(torch.tensor([r], dtype=torch.float64), mask), v, mask, gamma, lam)
    return adv[0].tolist()


def segment_advantages(bounds: list[int], adv: list[float], T: int, L: int) -> torch.Tensor:
    """Spread A_k over the tokens of segment k, [b_k, b_{k+1}); padding after T gets 0: [L]."""
    out = torch.zeros(L)
    for k, b in enumerate(bounds):
        out[b:bounds[k + 1] if k + 1 < len(bounds) else T] = adv[k]
    return out


def per_rollout(values: torch.Tensor, bounds: list[list[int]]) -> list[list[float]]:
    """The flat values [sum_i K_i], in states_of's order (rollout by rollout), as each rollout's V_0..V_{K_i-1}."""
    return [chunk.tolist() for chunk in torch.split(values, [len(b) for b in bounds])]


def rollout_advantages(values: torch.Tensor, bounds: list[list[int]], outcomes, lengths: list[int], L: int,
                       gamma: float, lam: float) -> torch.Tensor:
    """Each rollout's segment GAE from its own values and outcome, spread over its own tokens: [N, L]."""
    return torch.stack([segment_advantages(b, segment_gae(vs, y, gamma, lam), T, L)
                        for vs, b, y, T in zip(per_rollout(values, bounds), bounds, outcomes, lengths)])


# -------------------- Querying and training the critic --------------------------------------------


@dataclass
class State:
    """A state s_b of one actor rollout, as the critic sees it."""
    question: str
    partial: str  # the actor's first b response tokens, decoded
    left: int  # tokens left in the actor's budget
    outcome: float = 0.0  # the verified reward of the rollout it belongs to (what R_v compares with)


def critic_inputs(tok, states: list[State], args, actor: tuple[str, int], ema: float) -> list[list[int]]:
    """Token ids of each state's critic prompt (chat template), with ICC facts unless --no-icc."""
    return [tok(C.chat_prompt(tok, critic_prompt(s.question, s.partial, icc_context(*actor, ema, s.left)
                                                  if args.icc else None)), add_special_tokens=False)["input_ids"]
            for s in states]


def query_critic(sampler, tok, states: list[State], args, actor, ema: float, seed: int):
    """One critic sample per state -> (values [N] with the EMA where unparsable, parsed mask [N], rollouts)."""
    rollouts = sampler.generate(critic_inputs(tok, states, args, actor, ema), 1, args.critic_max_tokens,
                            args.critic_temperature, seed=seed)
    parsed = [parse_value(r.text) for r in rollouts]
    return (torch.tensor([ema if v is None else v for v in parsed]), torch.tensor([v is not None for v in parsed]),
            rollouts)


def critic_update(critic, optimizer, rollouts: list[C.Rollout], rewards: torch.Tensor, args, pad_id: int, dev,
                  seed: int) -> dict:
    """REINFORCE on the critic's tokens, grad = -(R_v - mean R_v) grad log pi_critic(answer), on --critic-batch answers
    drawn at random (the mean over all): common.policy_update at ratio 1, its token mean = token sum / batch tokens."""
    adv = rewards - rewards.mean()  # [N]
    order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(seed))
    keep = order[:args.critic_batch or len(rollouts)]
    batch = C.collate([rollouts[i] for i in keep], pad_id, dev)
    adv = adv[keep].to(dev)[:, None] * batch["response_mask"]  # [n, L]
    cargs = dataclasses.replace(args, temperature=args.critic_temperature, max_new_tokens=args.critic_max_tokens,
                                epochs=1, minibatch_size=0, kl_coef=0.0, loss_agg="token-mean")
    st = C.policy_update(critic, optimizer, batch, adv, cargs)
    return {"critic_grad_norm": st.get("grad_norm", float("nan")), "critic_nan_skips": st["nan_skips"]}


def states_of(tok, problems: list[C.Problem], rollouts: list[C.Rollout], outcomes,
              args) -> tuple[list[State], list[list[int]]]:
    """Every rollout's boundary states, flat, and each rollout's boundaries."""
    states, bounds = [], []
    for r, y in zip(rollouts, outcomes):
        b = segment_bounds(len(r.ids), args.segment)
        bounds.append(b)
        states += [State(problems[r.prompt_idx].question, tok.decode(r.ids[:t], skip_special_tokens=True),
                         args.max_new_tokens - t, float(y)) for t in b]
    return states, bounds


def monte_carlo_states(sampler, tok, problems: list[C.Problem], args) -> tuple[list[State], np.ndarray, float, int]:
    """Stage 1's states and their Monte-Carlo success rates p_MC, from the actor's own samples:
      the empty state of each problem ........ the mean of --sft-n rollouts
      a mid-response state of a rollout ...... the mean over the rollout and --sft-continuations fresh
                                               continuations from its prefix (each cut to the state's budget)
      the final token's state ................ the rollout's own outcome (one token is left, nearly always eos)
    Also returns the rollouts' success rate (the running mean ICC shows in the traces) and the continuations drawn."""
    n, m = args.sft_n, args.sft_continuations
    rollouts, y, _ = C.rollouts_scored(sampler, tok, problems, n, args, C.rollout_seed(args.seed, 0, 11),
                                         desc="sft rollouts")
    p_empty = np.bincount([r.prompt_idx for r in rollouts], weights=y, minlength=len(problems)) / n
    later = [(r, t, yi) for r, yi in zip(rollouts, y) for t in segment_bounds(len(r.ids), args.segment)[1:]]
    mid = [x for x in later if x[1] < len(x[0].ids) - 1]
    final = [x for x in later if x[1] == len(x[0].ids) - 1]
    hits = np.array([yi for _, _, yi in mid], float)  # the rollout itself is one sample from its state
    if m and mid:
        limit = args.max_new_tokens - min(t for _, t, _ in later)  # >= every mid state's budget
        cont = sampler.generate([r.prompt_ids + r.ids[:t] for r, t, _ in mid], m, limit, args.temperature,
                                seed=C.rollout_seed(args.seed, 0, 13), desc="continuations")
        full = [mid[c.prompt_idx][0].ids[:mid[c.prompt_idx][1]] + c.ids[:args.max_new_tokens - mid[c.prompt_idx][1]]
                for c in cont]
        cy, _ = C.score([tok.decode(ids, skip_special_tokens=True) for ids in full],
                        [problems[mid[c.prompt_idx][0].prompt_idx].answer for c in cont])
        np.add.at(hits, [c.prompt_idx for c in cont], cy)
    states = [State(p.question, "", args.max_new_tokens) for p in problems] + \
             [State(problems[r.prompt_idx].question, tok.decode(r.ids[:t], skip_special_tokens=True),
                    args.max_new_tokens - t) for r, t, _ in mid + final]
    p_mc = np.concatenate([p_empty, hits / (1 + m), [yi for _, _, yi in final]])
    return states, p_mc, float(np.mean(y)), len(mid) * m


# -------------------- The three stages ------------------------------------------------------------


def setup(args: Args, trainable_actor: bool):
    """The actor, the critic (--critic or a copy of the actor), the ICC facts, the running rate its checkpoint holds."""
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    policy.requires_grad_(trainable_actor)
    critic, cpath = ppo.second_model(args.critic, policy, tok, path, dev, dtype, "--critic")
    state = Path(args.critic) / ".." / "state.pt" if args.critic else None
    ema = C.read_state(state)["extra"].get("ema", 0.5) if state and state.exists() else 0.5
    actor = (Path(args.model).name if Path(args.model).exists() else args.model,
             sum(p.numel() for p in policy.parameters()))
    return dev, dtype, policy, tok, path, critic, cpath, ema, actor


def sft(args: Args) -> Path:
    """Stage 1: p_MC of rollouts' boundary states -> template traces -> the critic's cross-entropy on their tokens."""
    C.start_run(args, "genac sft")  # OUT/config.json
    dev, dtype, policy, tok, path, critic, cpath, _, actor = setup(args, trainable_actor=False)
    problems = C.ProblemStream(C.load_problems(args.data), args.seed + 1).take(args.sft_problems)  # not stage 3's order
    sampler = C.sampler_for(args, policy, tok, path, dtype, problems)
    states, p_mc, ema, conts = monte_carlo_states(sampler, tok, problems, args)
    del sampler
    eos = C.eos_ids(critic, tok)[0]
    targets = [tok(sft_trace(p, s.partial), add_special_tokens=False)["input_ids"] + [eos]
               for s, p in zip(states, p_mc)]
    seqs = [C.Rollout(0, ids, t, "", [0.0] * len(t), "stop")
            for ids, t in zip(critic_inputs(tok, states, args, actor, ema), targets)]

    optimizer = C.adamw(critic.parameters(), args.sft_lr)
    logger = C.RunLogger(args.out, 0, args.report_to)
    logger.CONSOLE = ["sft_loss", "sft_rows", "time_step"]
    one = dataclasses.replace(args, epochs=1, minibatch_size=0)
    per_epoch = -(-len(seqs) // args.micro_batch_size)
    logger.log(0, {"sft_rows": len(seqs), "sft_continuations": conts, "actor_acc": ema, "p_mc_mean": p_mc.mean()})
    for step in C.tqdm(range(1, per_epoch * args.sft_epochs + 1), desc="genac sft"):
        t0 = time.perf_counter()
        rows = C.shuffled_batch(step, len(seqs), args.micro_batch_size, args.seed)
        batch = C.collate([seqs[j] for j in rows], tok.pad_token_id, dev)

        def loss_fn(r):  # -mean log p(trace token): teacher forcing on the template
            lp = C.forward_logprobs(critic, C.slice_batch(batch, r), 1.0, args.logp_chunk)["logp"]
            loss = -C.masked_mean(lp, batch["response_mask"][r])
            return loss, {"sft_loss": loss.item()}
        with C.update_mode(critic, args.grad_checkpointing, args.autocast):  # the flags every update honours
            st = C.minibatch_update(optimizer, batch["response_mask"], one, loss_fn)
        logger.log(step, {**st, "time_step": time.perf_counter() - t0})
    C.save_checkpoint(args.out, per_epoch * args.sft_epochs, {"critic": (critic, optimizer)}, {"ema": ema},
                      keep=args.keep_checkpoints)
    return Path(args.out) / "ckpt" / "critic"


def pretrain(args: Args) -> Path:
    """Stage 2, the actor frozen: the critic answers for fresh rollouts' boundary states, REINFORCE steps on R_v."""
    C.start_run(args, "genac pretrain")
    dev, dtype, policy, tok, path, critic, cpath, ema, actor = setup(args, trainable_actor=False)
    stream = C.ProblemStream(C.load_problems(args.data), args.seed + 2)
    sampler = C.sampler_for(args, policy, tok, path, dtype, stream.problems)
    csampler = C.make_sampler(args.sampler, critic, tok, cpath, dtype, args.seed + 1, args.vllm_memory, 0, args.vllm_sleep)
    optimizer = C.adamw(critic.parameters(), args.critic_lr)
    logger = C.RunLogger(args.out, 0, args.report_to)
    logger.CONSOLE = ["acc", "critic_mse", "critic_reward", "critic_parse_fail", "time_step"]
    for step in C.tqdm(range(1, args.pretrain_steps + 1), desc="genac pretrain"):
        t0 = time.perf_counter()
        problems = stream.take(args.prompts_per_step)
        rollouts, y, _ = C.rollouts_scored(sampler, tok, problems, args.group_size, args,
                                             C.rollout_seed(args.seed, step))
        states, _ = states_of(tok, problems, rollouts, y, args)
        v, ok, croll = query_critic(csampler, tok, states, args, actor, ema, seed=C.second_seed(args.seed, step))
        r = torch.tensor([s.outcome for s in states])
        R = critic_rewards(r, v, ok)
        metrics = {"acc": float(np.mean(y)), "critic_mse": float(((v - r) ** 2).mean()),
                   "critic_reward": R.mean().item(), "critic_parse_fail": int((~ok).sum()),
                   "critic_tokens": sum(len(c.ids) for c in croll), "icc_ema": ema,
                   **critic_update(critic, optimizer, croll, R, args, tok.pad_token_id, dev, args.seed * 131 + step)}
        csampler.sync_weights(critic)
        ema = args.icc_ema * ema + (1 - args.icc_ema) * float(np.mean(y))
        logger.log(step, {**metrics, "time_step": time.perf_counter() - t0, "peak_mem_gb": C.peak_mem_gb()})
    C.save_checkpoint(args.out, args.pretrain_steps, {"critic": (critic, optimizer)}, {"ema": ema},
                      keep=args.keep_checkpoints)
    return Path(args.out) / "ckpt" / "critic"


def train(args: Args):
    """Stage 3: PPO with the generative critic at segment boundaries; both actor and critic learn."""
    C.start_run(args, "genac train", args.steps)
    dev, dtype, policy, tok, path, critic, cpath, ema, actor = setup(args, trainable_actor=True)
    optimizer = C.adamw(policy.parameters(), args.lr)
    critic_opt = C.adamw(critic.parameters(), args.critic_lr)
    parts = {"policy": (policy, optimizer), "critic": (critic, critic_opt)}
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    start = 0
    if args.resume:
        state = C.load_checkpoint(args.out, parts)
        start, stream.cursor, ema = state["step"], state["extra"]["cursor"], state["extra"]["ema"]
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set,
                            others={"critic": (critic.config, True)}, engines=2)  # the critic samples with its own
    csampler = C.make_sampler(args.sampler, critic, tok, cpath, dtype, args.seed + 1, args.vllm_memory, 0, args.vllm_sleep)
    logger = C.RunLogger(args.out, start, args.report_to)
    G, P = args.group_size, args.prompts_per_step

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="genac", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> rollouts -> verifiable rewards
        with timer("time_gen"):
            problems = stream.take(P)
            rollouts, correct, no_answer = C.rollouts_scored(sampler, tok, problems, G, args,
                                                               C.rollout_seed(args.seed, step))
        batch = C.collate(rollouts, tok.pad_token_id, dev)
        mask, L = batch["response_mask"], batch["response_ids"].shape[1]

        # 2. the method: the critic reasons about every boundary state, segment-level GAE from its values
        with timer("time_critic"):
            states, bounds = states_of(tok, problems, rollouts, correct, args)
            v, ok, croll = query_critic(csampler, tok, states, args, actor, ema, seed=C.second_seed(args.seed, step))
        adv = rollout_advantages(v, bounds, correct, [len(r.ids) for r in rollouts], L, args.gamma, args.lam)
        adv = adv.to(dev) * mask  # [N, L]
        r = torch.tensor([s.outcome for s in states])
        metrics = {"reward": float(np.mean(correct)), "acc": float(np.mean(correct)), "icc_ema": ema,
                   "critic_mse": float(((v - r) ** 2).mean()), "critic_parse_fail": int((~ok).sum()),
                   "critic_tokens": sum(len(c.ids) for c in croll), "critic_queries": len(states)}
        if args.whiten_adv:
            adv = C.masked_whiten(adv, mask)

        # 3. the actor's clipped update, then the critic's REINFORCE step on the fresh outcomes
        sampler.sleep()  # GPU: the engines free their memory for the update (--vllm-sleep)
        csampler.sleep()
        with timer("time_train"):
            metrics.update(C.policy_update(policy, optimizer, batch, adv, args))
            sampler.sync_weights(policy)
            R = critic_rewards(r, v, ok)
            metrics.update(critic_reward=R.mean().item(),
                           **critic_update(critic, critic_opt, croll, R, args, tok.pad_token_id, dev,
                                           args.seed * 131 + step))
            csampler.sync_weights(critic)
        ema = args.icc_ema * ema + (1 - args.icc_ema) * float(np.mean(correct))

        metrics.update(ppo.advantage_metrics(correct, adv, mask, rollouts, no_answer, G))
        if args.oracle_k > 0:  # diagnostic only: the critic's value of the empty state vs a Monte-Carlo p(x)
            v0 = torch.tensor([vs[0] for vs in per_rollout(v, bounds)]).view(P, G).mean(-1).numpy()
            metrics.update(C.oracle_baseline_mse(sampler, tok, problems, v0, args, seed=C.second_seed(args.seed, step)))

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, parts, {"cursor": stream.cursor, "ema": ema}, keep=args.keep_checkpoints)
    return logger.path


def run_all(args: Args):
    """No subcommand: stage 1 into OUT/sft, stage 2 into OUT/pretrain, stage 3 into OUT, each from the last's critic.
    --resume skips a stage that finished (stages 1 and 2 checkpoint once, at their end) and redoes one cut short."""
    out, critic, overwrite = Path(args.out), args.critic, args.overwrite or args.resume
    for name, stage, free in (("sft", sft, ()), ("pretrain", pretrain, ("critic",))):
        here = dataclasses.replace(args, out=str(out / name), critic=critic)  # stage 2's critic: stage 1's, so free
        if not C.finished_stage(here, f"genac {name}", out / name / "ckpt" / "critic", free):
            stage(dataclasses.replace(here, resume=False, overwrite=overwrite))
        critic = str(out / name / "ckpt" / "critic")
    resume = args.resume and (out / "ckpt" / "state.pt").exists()  # cut short before stage 3's first checkpoint: redo
    return train(dataclasses.replace(args, critic=critic, resume=resume, overwrite=overwrite))


COMMANDS = {"sft": sft, "pretrain": pretrain, "train": train}

if __name__ == "__main__":
    C.run_command(COMMANDS, run_all, Args)
