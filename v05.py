"""V0.5: the V0 prior fused with sparse rollouts, a real-time hypothesis test and an adaptive rollout budget.

Paper
  V_{0.5}: Generalist Value Model as a Prior for Sparse RL Rollouts, arXiv 2603.10848 (no official code found)

What the method changes (the formulas: a third-party reading consistent with the abstract; full text not checked)
  GRPO's group-mean baseline needs G ~ 16 rollouts per prompt. V0.5 starts from k_init = 4, treats V0's (v0.py)
  prediction V as a prior and fuses it with the sparse empirical mean v_k; s2 = 1 is one +-1 reward's (worst-case)
  variance, s2/k that of v_k; the positive part is a z-test at level 2 (1 - Phi(1)) ~ 0.317. Equation -> function:
      V: V0's p(x), in context of the policy's recent (prompt, success rate) rows              -> prior_from_v0
      D2 = max(0, (v_k - V)^2 - s2/k)       shrinkage estimate of the prior's squared bias     -> shrinkage
      w  = D2 / (D2 + s2/k)                 shrinkage weight on the rollouts                   -> shrinkage
      mu = w * v_k + (1 - w) * V            the fused baseline, from 0/1 counts                -> fuse
      D2 > 0 <=> |z| > 1                    z = (v_k - V) / sqrt(s2/k): H0 "V is right" fails  -> z_test_rejects
      R(k) = MSE(k) + c k, MSE(k) = D2 (s2/k) / (D2 + s2/k): the risk of stopping at k         -> risk, mse
      one more rollout while R(k+1) < R(k) (c = 0.0039 ~ 1/16^2), up to k_max = 16             -> wants_more
      the budget, batched across prompts (sure_extra; also drives benchmarks/v05_sim.py)       -> adaptive_rollouts

Choices that are ours, not the paper's (each in full: docs/v05.md#choices-that-are-ours)
  - The policy loss: A_i = r_i - mu on the +-1 scale (v05_advantages; --scale-std: / 2 sqrt(mu (1 - mu)), floored at
    0.2), over rollout i's tokens into common.policy_loss with the shared defaults, no KL term (--kl-coef 0).
  - --alpha: reject when |z| > z* = Phi^{-1}(1 - alpha/2) (z_critical), and D2 subtracts z*^2 s2/k (z* = 1 at the
    default). --test binomial: scipy's exact test of H0: p = V (binomial_rejects); D2 then the plug-in (v_k - V)^2.
  - Batching: a round samples every rollout the one-at-a-time rule is sure to buy (sure_extra); --round-max caps it.
  - V0 (--v0 auto: v0_checkpoint; never updated here): the arith V0_DEFAULT for smollm2-135m, else V0_GENERALIST.
    Its context: the policy's last --history 16 rows, from V0's rows of --model (v0_start) or a warm-up
    (warmup_problems), plus (--fresh-context) this step's other prompts' k_init rates; none: --prior-constant.
  - Ablation priors: oracle (Monte-Carlo p + noise; noisy_oracle_prior), constant, corrupt (corrupt_prior).
  - Metrics: test_reject_rate is the test's at k_init; acc weighs each prompt the same (as GRPO), reward each rollout.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from scipy import stats

import common as C
import v0 as V0  # the one allowed cross-import: V0.5 is V0 plus fusion
from common import arg

V0_DEFAULT = "pretrained/v0-smollm2-arith-ck"  # committed; V0 trained on the base policy and 3 of its GRPO checkpoints
V0_GENERALIST = "pretrained/v0-generalist"  # committed; v0.py trained on the V0 authors' rows (NOTICE, docs/v0.md)
GENERALIST_FAMILY = "qwen"  # the policies behind its rows: Qwen3-4B-Instruct and DeepSeek-R1-Distill-Qwen-1.5B
ALPHA = float(2 * stats.norm.sf(1.0))  # 2 (1 - Phi(1)) ~ 0.3173: the level of the paper's |z| <= 1 rule
COST = 0.0039  # c, on the +-1 reward scale: about 1/16^2


@dataclass
class Args(C.TrainArgs):
    """V0.5: GRPO-style training where the baseline fuses V0's prior with k >= k_init rollouts per prompt."""
    out: str = arg("runs/v05", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"preset": C.presets(cpu=dict(steps=8))}  # paper: k_init 4, k_max 16 as below
    k_init: int = arg(4, "rollouts every prompt gets before the test")
    k_max: int = arg(16, "rollouts a prompt can get at most")
    cost: float = arg(COST, "c: buy one more rollout while R(k+1) < R(k), i.e. the MSE drop exceeds c (+-1 scale)")
    round_max: int = arg(0, "cap on a prompt's extra rollouts per round (one generate call): 0 = every one the one-at-"
                         "a-time rule is sure to buy (sure_extra), 1 = one at a time; same decisions, other rounds")
    test: str = arg("z", "z: the two-sided z-test (at the default --alpha, the paper's positive-part rule |z| > 1); "
                    "binomial: exact scipy.stats.binomtest against V", choices=["z", "binomial"])
    alpha: float = arg(ALPHA, "level of the test (default 2 (1 - Phi(1)); z: reject when |z| > Phi^-1(1 - alpha/2))")
    scale_std: bool = arg(False, "divide A by the +-1 reward's Bernoulli std 2 sqrt(mu (1 - mu)) (floored at 0.2)")
    prior: str = arg("v0", "v0: the V0 model; oracle: Monte-Carlo p + noise; constant; corrupt: oracle, but far "
                     "off on --corrupt-frac of prompts", choices=["v0", "oracle", "constant", "corrupt"])
    v0: str = arg("auto", f"V0 checkpoint (auto: the shipped {V0_DEFAULT} when it was trained for --model, else "
                  "the generalist pretrained/v0-generalist)")
    history: int = arg(16, "the policy's most recent (prompt, success rate) rows V0 reads as context (ours)")
    fresh_context: bool = arg(True, "V0 also reads this step's other prompts' k_init success rates (leave-one-out; "
                              "ours: they are the only rows of the policy as it is now)")
    history_init: str = arg("auto", "rows the history starts from: auto (the V0 checkpoint's context.jsonl rows of "
                            "--model, if any), a rows .jsonl (prompt_dict.json beside it), or none")
    warmup_prompts: int = arg(0, "prompts rolled out k_init times before step 1 only to seed the history, counted in "
                              "the spend (0: none; the history starts from --history-init)")
    prior_noise: float = arg(0.1, "oracle/corrupt: std of the Gaussian noise added to the Monte-Carlo p")
    prior_constant: float = arg(0.5, "constant: the prior every prompt gets")
    corrupt_frac: float = arg(0.25, "corrupt: share of prompts whose prior is set to the far end")

    def __post_init__(self):
        super().__post_init__()
        for f, ok, need in [("k_init", 1 <= self.k_init <= self.k_max, f"in [1, --k-max] = [1, {self.k_max}]"),
                            ("alpha", 0 < self.alpha < 1, "in (0, 1)"), ("cost", self.cost >= 0, ">= 0"),
                            ("history", self.history >= 1, ">= 1"),
                            ("kl_coef", self.kl_coef == 0, "0 (v05.py keeps no reference policy)"),
                            ("prior_constant", 0 <= self.prior_constant <= 1, "in [0, 1]"),
                            ("corrupt_frac", 0 <= self.corrupt_frac <= 1, "in [0, 1]"),
                            ("oracle_k", self.prior in ("v0", "constant") or self.oracle_k > 0,
                             f"> 0 for --prior {self.prior} (its Monte-Carlo success rate; e.g. 16)")] + [
                            (f, getattr(self, f) >= 0, ">= 0") for f in ("round_max", "warmup_prompts", "prior_noise")]:
            if not ok:
                raise ValueError(f"--{C.flag(f)} must be {need}, got {getattr(self, f)}")


# ------------------ The method's own math (numpy; any reward scale unless said) -------------------


@functools.lru_cache  # scipy's scalar call is slow, and sure_extra asks it for every state it checks
def z_critical(alpha: float = ALPHA) -> float:
    """z* = Phi^{-1}(1 - alpha/2) (scipy): |z| > z*  <=>  p = 2 (1 - Phi(|z|)) < alpha.  z*(ALPHA) == 1.0 exactly."""
    return float(stats.norm.isf(alpha / 2))


def shrinkage(v_k, V, k, s2: float = 1.0, z2: float = 1.0):
    """D2 = max(0, (v_k - V)^2 - z2 s2/k),  w = D2 / (D2 + s2/k) -> (w, D2), arrays broadcast. s2: one reward's
    variance (1 on +-1, 1/4 on 0/1); z2 = 1: the paper's; z2 = z*^2 (ours): D2 > 0 exactly where z_test_rejects."""
    v_k, V, se2 = np.asarray(v_k, float), np.asarray(V, float), s2 / np.asarray(k, float)
    D2 = np.maximum(0.0, (v_k - V) ** 2 - z2 * se2)
    return D2 / (D2 + se2), D2


def z_test_rejects(v_k, V, k, s2: float = 1.0, alpha: float = ALPHA):
    """Two-sided z-test of H0: E[v_k] = V at level alpha: (v_k - V)^2 - z*^2 s2/k > 0, as shrinkage's D2 > 0. -> bool"""
    se2 = s2 / np.asarray(k, float)
    return (np.asarray(v_k, float) - np.asarray(V, float)) ** 2 - z_critical(alpha) ** 2 * se2 > 0


def binomial_rejects(hits, k, p0, alpha: float = ALPHA):
    """Exact two-sided binomial test of H0: success rate = p0 (0/1 counts) -> [N] bool."""
    hits, k, p0 = np.broadcast_arrays(np.asarray(hits), np.asarray(k), np.asarray(p0, float))
    return np.array([stats.binomtest(int(round(h)), int(n), float(np.clip(p, 0, 1))).pvalue < alpha
                     for h, n, p in zip(hits.ravel(), k.ravel(), p0.ravel())]).reshape(hits.shape)


def fuse(hits, k, prior, test: str = "z", alpha: float = ALPHA):
    """The fused baseline from 0/1 counts hits, k, prior (V0's p) [N], computed on the +-1 scale (v_k = 2 hits/k - 1,
    V = 2 p - 1, s2 = 1). -> (mu [N] on the 0/1 scale, w [N], D2 [N] on the +-1 scale, reject [N] bool)"""
    hits, k, prior = np.asarray(hits, float), np.asarray(k, float), np.asarray(prior, float)
    v, V = 2 * hits / k - 1, 2 * prior - 1
    if test == "z":
        reject = z_test_rejects(v, V, k, alpha=alpha)
        w, D2 = shrinkage(v, V, k, z2=z_critical(alpha) ** 2)  # D2 > 0 exactly where reject
    elif test == "binomial":
        reject = binomial_rejects(hits, k, prior, alpha)
        D2 = np.where(reject, (v - V) ** 2, 0.0)  # ours: the plug-in bias once the test has rejected
        w = D2 / (D2 + 1.0 / k)
    else:
        raise ValueError(f"test must be 'z' or 'binomial', got {test!r}")
    mu = w * v + (1 - w) * V
    return (mu + 1) / 2, w, D2, reject


def mse(D2, k, s2: float = 1.0):
    """Estimated MSE of mu after k rollouts:  MSE(k) = D2 (s2/k) / (D2 + s2/k)  (0 when H0 is kept)."""
    se2 = s2 / np.asarray(k, float)
    return np.asarray(D2, float) * se2 / (np.asarray(D2, float) + se2)


def risk(D2, k, cost: float = COST, s2: float = 1.0):
    """The risk of stopping at k:  R(k) = MSE(k) + c k  (the baseline's estimated error plus the rollouts' cost)."""
    return mse(D2, k, s2) + cost * np.asarray(k, float)


def wants_more(D2, k, cost: float = COST, k_max: int = 16, s2: float = 1.0):
    """One-step look-ahead: another rollout pays when R(k+1) < R(k), i.e. MSE(k) - MSE(k+1) > c, and k < k_max."""
    k = np.asarray(k)
    return (k < k_max) & (mse(D2, k, s2) - mse(D2, k + 1, s2) > cost)


def sure_extra(hits, k, prior, cost: float = COST, k_max: int = 16, test: str = "z", alpha: float = ALPHA):
    """Ours: how many more rollouts the one-at-a-time rule (fuse, wants_more) is sure to buy whatever they return: the
    (j+1)-th when it asks for more in every state after 0..j more. hits, k, prior [N] (0/1 counts, V0's p) -> [N] int"""
    hits, k = np.asarray(hits, float), np.asarray(k)
    m, sure = np.zeros(len(k), dtype=int), np.ones(len(k), dtype=bool)
    for j in range(k_max):  # j more rollouts drawn ...
        for a in range(j + 1):  # ... a of them successes
            sure &= wants_more(fuse(hits + a, k + j, prior, test, alpha)[2], k + j, cost, k_max)
        if not sure.any():
            break
        m += sure
    return m


def adaptive_rollouts(draw, prior, k_init: int = 4, k_max: int = 16, cost: float = COST, test: str = "z",
                      alpha: float = ALPHA, round_max: int = 0) -> dict:
    """V0.5's budget: k_init rollouts each, the prior V, then rounds (one draw call each) of the rollouts the
    one-at-a-time rule is sure to buy (sure_extra; at most round_max if > 0) until no look-ahead pays.
    draw(counts [N]) -> N lists of 0/1 rewards; prior: [N], or a function of the k_init rates (draw then has len()).
    -> dict(hits, k, mu, w, D2, prior [N], reject_init [N] (the test at k_init), reject [N] (the last test), rounds)"""
    if not 1 <= k_init <= k_max:
        raise ValueError(f"need 1 <= k_init <= k_max, got k_init={k_init}, k_max={k_max}")
    if callable(prior) and not hasattr(draw, "__len__"):
        raise ValueError("a prior given as a function needs a draw with len() (the number of prompts)")
    n = len(draw) if callable(prior) else len(prior)
    hits, k = np.zeros(n), np.zeros(n, dtype=int)
    counts, reject_init, rounds = np.full(n, k_init), None, 0
    while counts.any():
        for i, r in enumerate(draw(counts)):
            hits[i], k[i] = hits[i] + float(np.sum(r)), k[i] + len(r)
        if callable(prior):  # after the first round: V may read the k_init rates (of the other prompts)
            prior = np.asarray(prior(hits / k), float)
        mu, w, D2, reject = fuse(hits, k, prior, test, alpha)
        reject_init = reject if reject_init is None else reject_init
        counts = sure_extra(hits, k, prior, cost, k_max, test, alpha)
        counts = np.minimum(counts, round_max) if round_max > 0 else counts
        rounds += 1
    return dict(hits=hits, k=k, mu=mu, w=w, D2=D2, prior=np.asarray(prior, float), reject_init=reject_init,
                reject=reject, rounds=rounds)


def v05_advantages(rewards: torch.Tensor, group: torch.Tensor, mu: torch.Tensor, scale_std: bool = False,
                   std_floor: float = 0.1) -> torch.Tensor:
    """A_i = r_i - mu_g(i) on the +-1 scale = 2 (r01_i - mu01_g(i)); --scale-std (ours) divides by the +-1 reward's
    Bernoulli std 2 max(sqrt(mu (1 - mu)), floor). rewards [B] 0/1, group [B] prompt of each, mu [N] 0/1 -> [B]"""
    adv = 2 * (rewards - mu[group])  # (2 r - 1) - (2 mu - 1)
    if scale_std:
        adv = adv / (2 * (mu * (1 - mu)).sqrt().clamp(min=std_floor))[group]
    return adv


def prior_from_v0(model, backbone, history: list[tuple[str, float]], questions: list[str], fresh=None,
                  fallback: float = 0.5) -> np.ndarray:
    """V0's p(x_i) per question, in context of the history [(question, success rate)] and (ours) of fresh [N], this
    step's k_init rates of the others (never prompt i's own, which the test compares V with); none: fallback. -> [N]"""
    def p(ctx, qs):
        if not ctx:
            return np.full(len(qs), fallback)
        return V0.predict(model, backbone, [c[0] for c in ctx], [c[1] for c in ctx], qs)
    if fresh is None:
        return p(history, questions)
    rows = [(q, float(r)) for q, r in zip(questions, fresh)]
    return np.array([p(history + rows[:i] + rows[i + 1:], [q])[0] for i, q in enumerate(questions)])


def noisy_oracle_prior(p_oracle, noise: float, rng) -> np.ndarray:
    """oracle: V = clip(p + N(0, noise^2), 0, 1)."""
    return np.clip(np.asarray(p_oracle) + rng.normal(0.0, noise, len(p_oracle)), 0.0, 1.0)


def corrupt_prior(p_oracle, prior, frac: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """corrupt: on a random frac of prompts, V = 1 if p < 0.5 else 0 (wrong by at least 0.5). -> (V, corrupted)"""
    bad = rng.random(len(prior)) < frac
    return np.where(bad, (np.asarray(p_oracle) < 0.5).astype(float), prior), bad


# -------------------------- Where the prior starts, and the training loop -------------------------


def v0_checkpoint(args: Args) -> str:
    """--v0 auto: V0_DEFAULT when its rows name --model, else V0_GENERALIST; an explicit --v0 must be a V0 folder."""
    if args.v0 == "auto":
        arith = {r["model"].split("@")[0] for r in V0.read_rows(V0.v0_folder(V0_DEFAULT) / "context.jsonl")}
        return V0_DEFAULT if args.model in arith else V0_GENERALIST
    V0.v0_folder(args.v0, "--v0")  # a folder that holds no checkpoint fails here, naming the flag
    return args.v0


def rows_name(model: str, names) -> str | None:
    """The V0 authors' rows' name (e.g. 'Qwen3-4B-Instruct') for --model: its (alias-resolved) hub id's or folder's
    last part, any case, equal to a name or a name plus a release suffix ('-2507'). -> the longest match, or None"""
    base = Path(C.MODEL_ALIASES.get(model, model).rstrip("/")).name.lower()
    fits = [n for n in names if base == n.lower() or base.startswith(n.lower() + "-")]
    return max(fits, key=len) if fits else None


def family_seen(model: str, family: str = GENERALIST_FAMILY) -> bool:
    """Whether --model is of the family: by a folder's config.json model_type, else by its (alias-resolved) name."""
    cfg = Path(model) / "config.json"
    text = json.loads(cfg.read_text()).get("model_type", "") if cfg.exists() else C.MODEL_ALIASES.get(model, model)
    return family in Path(text).name.lower()


def v0_start(args: Args) -> dict:
    """Where the prior starts (--prior v0): the checkpoint and (--history-init auto) its earliest step's rows of --model
    (ours: f"{model}@T0.7"; the authors': rows_name); none: V0 reads the k_init rates whatever --fresh-context says;
    a warning if the generalist never saw --model's family. -> dict(ckpt, history, fresh_context, line, warning)"""
    ckpt = v0_checkpoint(args)
    why = "--v0" if args.v0 != "auto" else ("auto: its rows name --model" if ckpt == V0_DEFAULT else
                                             "auto: the generalist, trained on the V0 authors' rows")
    if args.history_init == "auto":
        path = V0.v0_folder(ckpt) / "context.jsonl"
        rows = V0.read_rows(path) if path.exists() else []
        names = {r["model"] for r in rows}
        label = f"{args.model}@T{args.temperature:g}"
        name = label if label in names else rows_name(args.model, names)
        step = min((r["step"] for r in rows if r["model"] == name), default=None)
        history = V0.initial_history(ckpt, "auto", args.history, name, step) if name else []
        at = f" at --temperature {args.temperature:g}" if any("@" in n for n in names) else ""
        source = f"{len(history)} of its rows of {name} (step {step})" if history else \
            f"no rows (V0 carries none of --model {args.model}{at})"
    else:
        history = V0.initial_history(ckpt, args.history_init, args.history)
        source = f"{len(history)} rows of --history-init {args.history_init}"
    fresh = args.fresh_context or not history
    warning = None
    if V0.v0_folder(ckpt).resolve() == V0.v0_folder(V0_GENERALIST).resolve() and not family_seen(args.model):
        seen = sorted({r["model"] for r in V0.read_rows(V0.v0_folder(V0_GENERALIST) / "context.jsonl")})
        warning = (f"V0 never saw a policy of --model {args.model}'s family (its rows: {', '.join(seen)}); its prior "
                   "may be far off, and the test then buys more rollouts. A V0 for this policy: docs/v0.md "
                   "(benchmarks/v0_collect.py, then v0.py; pass it as --v0)")
    line = (f"v05: V0 {ckpt} ({why}); the history starts with {source}"
            + ("; V0 also reads this step's k_init rates" if fresh else ""))
    return dict(ckpt=ckpt, history=history, fresh_context=fresh, line=line, warning=warning)


class PolicyDraw:
    """adaptive_rollouts' draw in training: counts[i] rollouts of prompt i in one generate call, scored and kept."""

    def __init__(self, sampler, tok, problems: list[C.Problem], args: Args, seed: int, timer=None):
        self.sampler, self.problems, self.args = sampler, problems, args
        self.seed, self.timer = seed, timer or C.Timer()
        self.texts = [C.build_prompt(tok, p) for p in problems]
        self.rollouts, self.rewards = [[] for _ in problems], [[] for _ in problems]
        self.calls, self.no_answer = 0, 0

    def __len__(self):
        return len(self.problems)

    def __call__(self, counts) -> list[list[float]]:
        idx = np.nonzero(counts)[0]
        with self.timer("time_gen"):  # sampling and scoring, as time_gen is in grpo.py
            rollouts = self.sampler.generate([self.texts[i] for i in idx], counts[idx].tolist(),
                                             self.args.max_new_tokens, self.args.temperature,
                                             seed=self.seed + 7_001 * self.calls)
            answers = [self.problems[idx[r.prompt_idx]].answer for r in rollouts]
            correct, n_no_answer = C.score([r.text for r in rollouts], answers)
        self.calls, self.no_answer = self.calls + 1, self.no_answer + n_no_answer
        new = [[] for _ in self.problems]
        for r, c in zip(rollouts, correct):
            i = idx[r.prompt_idx]
            new[i].append(c)
            self.rollouts[i].append(r)
            self.rewards[i].append(c)
        return new


def warmup_problems(problems: list[C.Problem], seed: int, k: int) -> list[C.Problem]:
    """Ours: the warm-up takes the last k problems of the training stream's first pass, so it shares no prompt with
    the first n - k training takes, and step s trains on the prompts grpo.py's step s does at the same seed."""
    tail = C.ProblemStream(problems, seed)
    tail.cursor = max(len(problems) - k, 0)
    return tail.take(min(k, len(problems)))


def log_prompts(path, step: int, problems: list[C.Problem], rewards: list[list[float]], **per_prompt):
    """Append this step's rows to OUT/prompts.jsonl: question, answer, 0/1 rewards as drawn, and per_prompt's."""
    with open(path, "a") as fh:
        for i, (p, r) in enumerate(zip(problems, rewards)):
            extra = {name: (v[i].item() if hasattr(v[i], "item") else v[i]) for name, v in per_prompt.items()}
            fh.write(json.dumps({"step": step, "question": p.question, "answer": p.answer,
                                   "rewards": [int(x) for x in r], **extra}) + "\n")


def main(args: Args):
    C.start_run(args, "v05", args.steps)  # OUT/config.json; refuses a mismatched --resume
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    v0model, backbone = V0.load_v0(v0_checkpoint(args)) if args.prior == "v0" else (None, None)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    optimizer = C.adamw(policy.parameters(), args.lr)
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    history, start = [], 0  # history: [(question, empirical success rate)], newest last
    if args.resume:
        state = C.load_checkpoint(args.out, {"policy": (policy, optimizer)})
        start, stream.cursor, history = state["step"], state["extra"]["cursor"], state["extra"]["history"]
    elif args.prior == "v0":  # the policy before any update: V0's rows of it when it has them (v0_start)
        init = v0_start(args)
        history, args.fresh_context = init["history"], init["fresh_context"]
        print(init["line"])
        if init["warning"]:
            print(f"v05: warning: {init['warning']}")
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set)
    logger = C.RunLogger(args.out, start, args.report_to)
    prompt_log = Path(args.out) / "prompts.jsonl"  # one row per prompt and step: where the budget went, and why
    C.keep_steps(prompt_log, start)

    if start == 0:  # --warmup-prompts > 0: k_init rollouts on other prompts, only to seed V0's history
        warm = warmup_problems(train_set, args.seed, args.warmup_prompts) if args.prior == "v0" else []
        metrics = {"eval_acc": C.run_eval(sampler, tok, eval_set, args) if eval_set else None}
        if warm:
            draw = PolicyDraw(sampler, tok, warm, args, seed=C.rollout_seed(args.seed, 0))
            rates = np.array([np.mean(r) for r in draw(np.full(len(warm), args.k_init))])
            history = (history + [(p.question, float(r)) for p, r in zip(warm, rates)])[-args.history:]
            log_prompts(prompt_log, 0, warm, draw.rewards)
            metrics.update(rollouts=len(warm) * args.k_init, acc=float(rates.mean()))
        logger.log(0, metrics)

    for step in C.tqdm(range(start + 1, args.steps + 1), desc="v05", initial=start, total=args.steps):
        timer, t0, metrics = C.Timer(), time.perf_counter(), {}
        problems = stream.take(args.prompts_per_step)
        seed, rng = C.rollout_seed(args.seed, step), np.random.default_rng([args.seed, step])
        # 1. for diagnostics or the ablation priors: a Monte-Carlo p from rollouts kept out of training
        p_oracle = (C.success_rates(sampler, tok, problems, args.oracle_k, args.max_new_tokens, args.temperature,
                                    seed=C.second_seed(args.seed, step)) if args.oracle_k > 0 else None)
        corrupted = None
        if args.prior == "v0":  # V0 in context of the history (and of this step's k_init rates, once drawn)
            def prior(rates_init):
                with timer("time_prior"):
                    return prior_from_v0(v0model, backbone, history, [p.question for p in problems],
                                         rates_init if args.fresh_context else None, args.prior_constant)
        elif args.prior == "constant":
            prior = np.full(len(problems), args.prior_constant)
        else:
            prior = noisy_oracle_prior(p_oracle, args.prior_noise, rng)
            if args.prior == "corrupt":
                prior, corrupted = corrupt_prior(p_oracle, prior, args.corrupt_frac, rng)

        # 2. k_init rollouts each, the prior V, the test, and more rollouts where the prior looks wrong
        draw = PolicyDraw(sampler, tok, problems, args, seed, timer)
        res = adaptive_rollouts(draw, prior, args.k_init, args.k_max, args.cost, args.test, args.alpha, args.round_max)
        rates, k, prior = res["hits"] / res["k"], res["k"], res["prior"]
        history = (history + [(p.question, float(r)) for p, r in zip(problems, rates)])[-args.history:]
        log_prompts(prompt_log, step, problems, draw.rewards, prior=prior, mu=res["mu"], reject_init=res["reject_init"])

        # 3. A_i = r_i - mu (+-1 scale), broadcast over tokens
        rollouts = [r for group in draw.rollouts for r in group]
        rewards = torch.tensor([c for group in draw.rewards for c in group])  # [B], in the order of rollouts
        gidx = torch.repeat_interleave(torch.arange(len(problems)), torch.tensor(k))
        adv = v05_advantages(rewards, gidx, torch.tensor(res["mu"], dtype=torch.float32), args.scale_std)
        metrics.update(**C.batch_metrics(draw.rewards, adv, rollouts, draw.no_answer),
                       reward=rewards.mean().item(), acc=float(rates.mean()), k_mean=float(k.mean()),
                       k_max_hit=float(np.mean(k >= args.k_max)), test_reject_rate=float(res["reject_init"].mean()),
                       w_mean=float(res["w"].mean()), rounds=res["rounds"], prior_mean=float(prior.mean()))
        if p_oracle is not None:
            metrics.update(prior_mse=float(np.mean((prior - p_oracle) ** 2)),
                           fused_mse=float(np.mean((res["mu"] - p_oracle) ** 2)),
                           empirical_mse=float(np.mean((rates - p_oracle) ** 2)),
                           oracle_var=float(np.mean(p_oracle * (1 - p_oracle) / max(args.oracle_k - 1, 1))))
            metrics["baseline_mse"] = metrics["fused_mse"]
        if corrupted is not None and corrupted.any() and (~corrupted).any():
            metrics.update(corrupt_k_mean=float(k[corrupted].mean()), clean_k_mean=float(k[~corrupted].mean()),
                           corrupt_reject_rate=float(res["reject_init"][corrupted].mean()))
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
    main(C.parse_args(Args))
