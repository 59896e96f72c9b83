"""POISE: a probe on the policy's own hidden states as the critic, with the cross-rollout baseline.

Paper
  Your Language Model is Its Own Critic: Reinforcement Learning with Value Estimation from Actor's Internal
  States (POISE), arXiv 2605.07579; code: holi-lab/POISE ("the release")

What the method is
  PPO's critic is a second network as large as the policy. POISE reads what the policy already computes:
  the hidden states and token entropies of the log-prob forward pass. For rollout i of prompt x,
      z_i = [ mean of the last 10 prompt-token states,                      (output of model.layers[l], d dims)
              mean of the last 10 response-token states (up to </think>),   (output of model.layers[l], d dims)
              mean token entropy over the response, the reasoning span, the answer span ]   (3)
  and a tiny probe g = ridge(standardise(PCA_32(prompt part), PCA_64(response part), entropies)) predicts
  the prompt's success rate, clipped to [0, 1]. With n >= 2 rollouts per prompt (the release uses 2):
      b_i = 1/(n-1) sum_{j != i} g(z_j)     the baseline reads only the siblings' features
      A_i = r_i - b_i                        no std division
      t_i = 1/(n-1) sum_{j != i} r_j         the probe's training target for row z_i
  z_i carries information about rollout i's own outcome (its answer-span entropy, its final states), so a
  baseline g(z_i) would correlate with r_i and bias the gradient. b_i reads only the siblings, independent of
  y_i given x, with g fit on earlier steps, so E[b_i grad log pi(y_i|x)] = E[b_i] E[grad log pi(y_i|x)] = 0
  whatever g was fit to: a probe fit to each row's own reward r_i gives an unbiased gradient too. t_i is
  chosen for the variance: fit to r_i, g(z_i) learns E[r_i | z_i], partly rollout i's own outcome; fit to
  t_i, it learns E[r_j | z_i] = E[p(x) | z_i], the prompt's success rate, and since
  E[A_i^2] = E[(r_i - p(x))^2] + E[(b_i - p(x))^2], the closer b_i is to p(x), the smaller the variance.
  The first --rloo-steps (16) updates use RLOO (b_i = mean of the siblings' rewards) while rows (z_i, t_i)
  fill a FIFO buffer (4096 rows); from then on the probe is refit from scratch on the buffer after every
  step, and a step's advantages use the probe from before that step's refit.
  From the release: l = 19 on Qwen3-4B (layer_index, counted from 0: the 20th of 36 blocks, transformers'
  hidden_states[20]); the whole-response entropy counts every generated token, eos included, and so do the
  response states when there is no </think>; the reasoning span is strictly inside <think>...</think>; the
  answer span is inside <answer>...</answer>, else after </think>; an empty span's entropy is 0.

Equation -> function
  l: model.layers[l], counted from 0 .. probe_layer_index, features_pass
  spans (eos, <think>, <answer>) ...... text_spans, response_spans
  z_i ................................. rollout_features (from common.forward_logprobs' hidden + entropy)
  PCA, standardisation, ridge ......... pca_fit, standardize_fit, ridge_fit; the probe: fit_probe, probe_predict
  b_i, t_i, RLOO (leave-one-out means)  leave_one_out
  A_i = r_i - b_i ..................... poise_advantages
  one step: A_i, and rows (z_i, t_i) .. cross_rollout_step
  FIFO of whole groups ................ fifo_append
  non-finite features (ours) .......... finite_groups, probe_or_rloo

Choices that are ours, not the paper's
  - The features need a no-grad forward over the batch before the update (advantages must exist before the
    loss). verl runs that pass anyway (old log-probs); our trainer skips it when there is one optimizer step
    per batch, so here it is an extra forward (~1/3 of a forward+backward). Its log-probs are passed on as
    pi_old, so --epochs > 1 costs no further pass.
  - --probe-layer -1 picks model.layers[min(n_layers // 2 + 1, n_layers - 1)]: 19 of 36 as the release on
    Qwen3-4B, 16 of the CPU default's 30. The release sets the index per model instead (OLMo-3-7B: 7 of 32,
    with the last 32 states averaged).
  - Spans in text with none of <think>, </think>, <answer>, </answer> (a model that does not think, like
    the CPU default, where the release's two spans are empty): the answer span starts at the last \\boxed,
    the reasoning span is what comes before (all of it without \\boxed).
  - A token is in a span when its own decoded text overlaps it (the release's rule), from decoding each
    generated token; the release re-tokenises the decoded text for character offsets and, when that gives
    another token count than the response (as when the response ends in eos, which decoding drops), counts
    span tokens from the response's start and end instead. The last </think> is found in the text (the
    release matches the token ids of "</think>"; the same where it is one token, as in Qwen3).
  - PCA keeps min(32 or 64, rows - 1, d) components (the release: rows, not rows - 1), by an exact SVD (the
    release: scikit-learn's randomized PCA). As the release's StandardScaler, a feature with zero spread
    after PCA is left unscaled.
  - One probe; the release keeps one per domain of its training mix (math, code, other), each with its own
    buffer (4096 math rows, 3072 others).
  - --warmup-steps (8): the probe is first fit after step 8, and until --rloo-steps only the probe_* metrics use it;
    the release (from scratch) first fits after its 16 RLOO steps (its warmup_steps, 8, gates refits only
    when it starts from saved probes). The advantages are the same while warmup_steps <= rloo_steps.
  - probe_r / probe_mae: this step's predictions (probe from before the refit) against t_i, the target the
    probe is trained on (the release's regression diagnostics do the same). probe_r is null when either side
    has no spread.
  - A group with a non-finite feature (a bf16 overflow on a GPU, say) stays out of the buffer, where it would
    break every later refit, and takes RLOO's baseline this step (finite_groups, probe_or_rloo); counted in
    nonfinite_groups.
  - --preset cpu (the default without a GPU): 8 prompts x 2 rollouts, one optimizer step per batch, temperature
    0.7, lr 3e-5, clip 0.2 / 0.2 without dual-clip, 20 steps: common.CPU, chosen for the 135M model on 2 cores.
    --preset paper: the release's 256 prompts x 2, mini-batches of 64 rollouts (32 prompts), temperature 1,
    lr 1e-6, clip 0.2 / 0.28, dual-clip 10, 8192 tokens, Qwen3-4B (common.PAPER, docs/gpu.md). Both: 1 epoch,
    token-mean, no KL, grad clip 1.0. Neither sets the release's AdamW weight decay 0.01 and 10-step lr warm-up
    (no flags here), nor its sampled evaluation (temperature 0.6, top-p 0.95; ours mean@16 at temperature 1).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import common as C
from common import arg

PRESET = C.presets(  # --preset: the shared values (common.CPU, common.PAPER) and these
    cpu=dict(eps_high=0.2, dual_clip=0.0),
    paper=dict(prompts_per_step=256, eps_high=0.28, dual_clip=10.0, minibatch_size=64))


@dataclass
class Args(C.TrainArgs):
    """POISE: a ridge probe on the policy's hidden states and entropies, cross-rollout baseline, no critic."""
    out: str = arg("runs/poise", "run folder: metrics.jsonl, checkpoints")
    PRESETS: ClassVar[dict] = {"preset": PRESET}
    eps_high: float | None = arg(None, "PPO clip: ratio upper bound 1 + eps_high (default: set by --preset)")
    dual_clip: float | None = arg(None, "dual-clip constant c for negative advantages, 0: off (default: set by "
                                  "--preset)")
    group_size: int = arg(2, "n: rollouts per prompt (>= 2; the release uses 2)")
    probe_layer: int = arg(-1, "the probe reads the output of model.layers[l], counted from 0 as the release's "
                           "layer_index (19 on Qwen3-4B); -1: min(n_layers // 2 + 1, n_layers - 1) (ours)")
    last_n: int = arg(10, "states averaged at the end of the prompt and at the end of the response")
    prompt_pca: int = arg(32, "PCA dims of the prompt states")
    response_pca: int = arg(64, "PCA dims of the response states")
    ridge_alpha: float = arg(100.0, "ridge penalty alpha")
    buffer: int = arg(4096, "probe rows kept (FIFO; the oldest whole groups are dropped)")
    warmup_steps: int = arg(8, "steps of rows collected before the probe is first fit")
    rloo_steps: int = arg(16, "first updates that use RLOO advantages while the probe's rows accumulate")

    def __post_init__(self):
        super().__post_init__()
        for ok, msg in (
                (self.group_size >= 2, f"--group-size must be >= 2 (b_i and t_i average a prompt's other rollouts), "
                                       f"got {self.group_size}"),
                (self.probe_layer >= -1, f"--probe-layer must be a model.layers index or -1, got {self.probe_layer}"),
                (self.last_n >= 1, f"--last-n must be >= 1, got {self.last_n}"),
                (min(self.prompt_pca, self.response_pca) >= 1,
                 f"--prompt-pca and --response-pca must be >= 1, got {self.prompt_pca} and {self.response_pca}"),
                (self.ridge_alpha > 0, f"--ridge-alpha must be > 0 (0 divides by the buffer's zero singular values), "
                                       f"got {self.ridge_alpha}"),
                (self.buffer >= self.group_size, f"--buffer must hold a group (>= --group-size), got {self.buffer}"),
                (min(self.warmup_steps, self.rloo_steps) >= 0, "--warmup-steps and --rloo-steps must be >= 0")):
            if not ok:
                raise ValueError(msg)


# ------------------------------------------------------------------------------------------------
# Features: from the hidden states and entropies of the log-prob forward pass
# ------------------------------------------------------------------------------------------------

THINK = re.compile(r"<think>\s*(.*?)\s*</think>", re.I | re.S)
ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.I | re.S)
TAGS = re.compile(r"</?think>|</?answer>", re.I)


def probe_layer_index(probe_layer: int, n_layers: int) -> int:
    """--probe-layer -> l, the index into model.layers (from 0) whose output the probe reads."""
    layer = min(n_layers // 2 + 1, n_layers - 1) if probe_layer == -1 else probe_layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"--probe-layer {probe_layer}: the model has model.layers[0..{n_layers - 1}]")
    return layer


def text_spans(text: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Character spans [start, end) of the reasoning and of the answer in a response's text (None: no span).
    As the release: reasoning inside the first <think>...</think>, answer inside the first
    <answer>...</answer>, else from after the first </think> to the end; whitespace at their edges left out.
    Ours, in text with none of these tags: the answer from the last \\boxed on, the reasoning before it."""
    think, answer = THINK.search(text), ANSWER.search(text)
    reasoning, ans = (think.span(1) if think else None), (answer.span(1) if answer else None)
    if ans is None and "</think>" in text:
        rest = text[text.find("</think>") + len("</think>"):]
        start = len(text) - len(rest.lstrip())
        ans = (start, len(text)) if start < len(text) else None
    if not TAGS.search(text):
        boxed = text.rfind("\\boxed")
        reasoning, ans = ((0, boxed), (boxed, len(text))) if boxed >= 0 else ((0, len(text)), None)
    return reasoning, ans


def response_spans(tok, rollouts, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(state_end [B], whole, reasoning, answer [B, L] bool). The response states used end at state_end:
    just after the token that closes the last </think>, else after the last generated token (eos included).
    The masks pick the tokens each entropy averages: every generated token (eos included), and the tokens
    whose decoded text overlaps text_spans' reasoning / answer (eos decodes to nothing: in neither)."""
    state_end, masks = [], np.zeros((3, len(rollouts), L), dtype=bool)
    for b, r in enumerate(rollouts):
        n = len(r.ids)
        pieces = tok.batch_decode([[i] for i in r.ids], skip_special_tokens=True) if n else []
        width = np.array([len(p) for p in pieces], dtype=int)  # [n]
        ends = np.cumsum(width)  # [n] character offset where each token ends
        text = "".join(pieces)
        think = text.rfind("</think>")
        state_end.append(int(np.searchsorted(ends, think + len("</think>") - 1, side="right")) + 1 if think >= 0 else n)
        masks[0, b, :n] = True
        for k, span in enumerate(text_spans(text), 1):
            if span is not None:
                masks[k, b, :n] = (width > 0) & (ends > span[0]) & (ends - width < span[1])
    return np.array(state_end), masks[0], masks[1], masks[2]


def span_mean(x: torch.Tensor, start, end) -> torch.Tensor:
    """x: [B, T, ...]; mean over positions [start_b, end_b) of each row; 0 for an empty span. -> [B, ...]"""
    pos = torch.arange(x.shape[1], device=x.device)[None, :]
    m = ((pos >= torch.as_tensor(start, device=x.device)[:, None]) &
         (pos < torch.as_tensor(end, device=x.device)[:, None])).to(x.dtype)  # [B, T]
    m = m.view(*m.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def rollout_features(hidden, entropy, prompt_len: int, prompt_lens, spans, last_n: int = 10) -> np.ndarray:
    """z_i for each row: hidden [B, P+L, d] (prompt left-padded to P), entropy [B, L], prompt_lens [B] (real
    prompt tokens), spans = response_spans(...). -> [B, 2d + 3] float32:
    [mean of the last n prompt states | mean of the last n response states | H_all, H_reasoning, H_answer]."""
    state_end, *masks = (torch.as_tensor(s) for s in spans)
    P = prompt_len
    p_start = P - torch.as_tensor(prompt_lens).clamp(max=last_n)
    prompt_part = span_mean(hidden.float(), p_start, torch.full_like(p_start, P))  # [B, d]
    r_end = P + state_end
    response_part = span_mean(hidden.float(), (r_end - last_n).clamp(min=P), r_end)  # [B, d]
    ent = entropy.float()
    h = torch.stack([(ent * m).sum(1) / m.sum(1).clamp(min=1) for m in masks], -1)  # [B, 3]; empty span: 0
    return torch.cat([prompt_part, response_part, h], -1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def features_pass(policy, batch: dict, rollouts, tok, args) -> tuple[np.ndarray, torch.Tensor]:
    """The log-prob forward pass, without autograd, in micro-batches: (z [B, 2d+3], log pi_old [B, L])."""
    layer = probe_layer_index(args.probe_layer, len(policy.get_decoder().layers))
    spans, B = response_spans(tok, rollouts, batch["response_ids"].shape[1]), len(rollouts)
    prompt_lens = np.array([len(r.prompt_ids) for r in rollouts])
    feats, logp = [], []
    for s in range(0, B, args.micro_batch_size):
        rows = slice(s, s + args.micro_batch_size)
        out = C.forward_logprobs(policy, C.slice_batch(batch, rows), args.temperature, args.logp_chunk,
                                 entropy=True, hidden_layer=layer + 1)  # common counts blocks from 1
        feats.append(rollout_features(out["hidden"], out["entropy"], batch["prompt_len"], prompt_lens[rows],
                                      tuple(c[rows] for c in spans), args.last_n))
        logp.append(out["logp"])
    return np.concatenate(feats), torch.cat(logp)


# ------------------------------------------------------------------------------------------------
# The probe: PCA -> standardise -> ridge, a few lines of numpy
# ------------------------------------------------------------------------------------------------


def pca_fit(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """X [N, d] -> (mean [d], components [k', d]) with k' = min(k, N - 1, d): the top right-singular vectors
    of the centred X, i.e. the top eigenvectors of its covariance. Signs fixed (largest entry positive)."""
    mean = X.mean(0)
    _, _, Vt = np.linalg.svd(X - mean, full_matrices=False)
    comp = Vt[:max(min(k, X.shape[0] - 1, X.shape[1]), 1)]
    comp *= np.sign(comp[np.arange(len(comp)), np.abs(comp).argmax(1)])[:, None]
    return mean, comp


def standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std of X [N, d]; a column with no spread keeps std 1 (it becomes 0, not NaN), as
    scikit-learn's StandardScaler in the release."""
    std = X.std(0)
    return X.mean(0), np.where(std > 1e-8, std, 1.0)


def ridge_fit(X: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """min_w,c ||y - X w - c||^2 + alpha ||w||^2 (intercept not penalised): centre X and y, then from the SVD
    X_c = U S V^T:  w = V diag(s / (s^2 + alpha)) U^T y_c,  c = mean(y) - mean(X) w."""
    xm, ym = X.mean(0), y.mean()
    U, s, Vt = np.linalg.svd(X - xm, full_matrices=False)
    w = Vt.T @ ((s / (s ** 2 + alpha)) * (U.T @ (y - ym)))
    return w, float(ym - xm @ w)


def _pca_parts(probe: dict, F: np.ndarray) -> np.ndarray:
    """[N, 2d + 3] -> [N, k_prompt + k_response + 3]: each hidden-state part projected on its own components."""
    d = probe["d"]
    return np.concatenate([(F[:, :d] - probe["p_mean"]) @ probe["p_comp"].T,
                           (F[:, d:2 * d] - probe["r_mean"]) @ probe["r_comp"].T, F[:, 2 * d:]], 1)


def fit_probe(F: np.ndarray, y: np.ndarray, d: int, prompt_pca: int = 32, response_pca: int = 64,
              alpha: float = 100.0) -> dict:
    """F [N, 2d + 3] rows z_i, y [N] targets t_i -> the probe's arrays (a dict, so it saves as it is)."""
    F = F.astype(np.float64)
    probe = {"d": d}
    probe["p_mean"], probe["p_comp"] = pca_fit(F[:, :d], prompt_pca)
    probe["r_mean"], probe["r_comp"] = pca_fit(F[:, d:2 * d], response_pca)
    Z = _pca_parts(probe, F)
    probe["z_mean"], probe["z_std"] = standardize_fit(Z)
    probe["w"], probe["c"] = ridge_fit((Z - probe["z_mean"]) / probe["z_std"], y.astype(np.float64), alpha)
    return probe


def probe_predict(probe: dict, F: np.ndarray) -> np.ndarray:
    """g(z) = clip(ridge(standardise(PCA(z))), 0, 1): [N]."""
    Z = (_pca_parts(probe, F.astype(np.float64)) - probe["z_mean"]) / probe["z_std"]
    return np.clip(Z @ probe["w"] + probe["c"], 0.0, 1.0)


def fifo_append(X: np.ndarray | None, y: np.ndarray | None, X_new: np.ndarray, y_new: np.ndarray, cap: int,
                n: int) -> tuple[np.ndarray, np.ndarray]:
    """Append rows (whole groups of n, in order) and keep the newest whole groups that fit in cap rows."""
    X = X_new if X is None else np.concatenate([X, X_new])
    y = y_new if y is None else np.concatenate([y, y_new])
    keep = min(len(y), (cap // n) * n)
    return X[len(y) - keep:], y[len(y) - keep:]


# ------------------------------------------------------------------------------------------------
# The cross-rollout construction
# ------------------------------------------------------------------------------------------------


def leave_one_out(v: torch.Tensor) -> torch.Tensor:
    """[N, n] -> [N, n]: entry i is the mean of the other n - 1 entries of its row.
    On probe values: the baseline b_i; on rewards: the probe's target t_i, and RLOO's baseline."""
    n = v.shape[-1]
    if n < 2:
        raise ValueError(f"--group-size {n}: the cross-rollout baseline needs n >= 2 rollouts per prompt")
    return (v.sum(-1, keepdim=True) - v) / (n - 1)


def poise_advantages(rewards: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [N, n], values [N, n] = g(z) of each rollout (None: RLOO) -> A [N, n].
        A_i = r_i - 1/(n-1) sum_{j != i} g(z_j)      (RLOO: g(z_j) replaced by r_j); no std division"""
    return rewards - leave_one_out(rewards if values is None else values)


def finite_groups(F: np.ndarray, n: int) -> np.ndarray:
    """F [B, k] feature rows in groups of n -> [B // n] bool: every row of the group is finite."""
    return np.isfinite(F).all(1).reshape(-1, n).all(1)


def probe_or_rloo(values: torch.Tensor, rewards: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """values [N, n] = g(z), rewards [N, n], ok [N] -> [N, n]: a group whose features were not finite gets its
    rewards in place of g(z), so poise_advantages gives it RLOO's baseline (ours; the release has no such case)."""
    return torch.where(ok[:, None], values, rewards)


def cross_rollout_step(rewards: torch.Tensor, feats: np.ndarray, probe: dict | None, use_probe: bool):
    """One step's cross-rollout construction. rewards [N, n]; feats [N*n, 2d+3], rows grouped by prompt; probe
    from before this step's refit (None before the first fit) -> (A [N, n], g [N, n] or None, t [N, n],
    ok [N], (X, y)): A from the probe if use_probe and there is one, else RLOO; (X, y) the rows (z_i, t_i)
    of the finite groups, for the buffer."""
    N, n = rewards.shape
    targets, ok = leave_one_out(rewards), finite_groups(feats, n)  # t_i [N, n]; [N]
    g = None
    if probe is not None:
        g = torch.tensor(probe_predict(probe, feats), dtype=torch.float32).view(N, n)
        g = probe_or_rloo(g, rewards, torch.from_numpy(ok))
    adv = poise_advantages(rewards, g if use_probe else None)
    rows = np.repeat(ok, n)  # [N*n]
    return adv, g, targets, ok, (feats[rows], targets.flatten().numpy()[rows])


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


def main(args: Args):
    C.start_run(args, "poise", args.steps)  # OUT/config.json; refuses a mismatched --resume
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    try:
        args.probe_layer = probe_layer_index(args.probe_layer, len(policy.get_decoder().layers))
    except ValueError as e:
        raise SystemExit(f"{e} ({args.model})") from None
    d = policy.config.hidden_size
    optimizer = C.adamw(policy.parameters(), args.lr)
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    start, buf_X, buf_y, probe = 0, None, None, None
    if args.resume:
        state = C.load_checkpoint(args.out, {"policy": (policy, optimizer)})
        start, stream.cursor = state["step"], state["extra"]["cursor"]
        buf_X, buf_y = state["extra"]["buffer_X"], state["extra"]["buffer_y"]
    fit = lambda: fit_probe(buf_X, buf_y, d, args.prompt_pca, args.response_pca, args.ridge_alpha)  # noqa: E731
    if start >= args.warmup_steps and buf_y is not None and len(buf_y):
        probe = fit()  # closed form on the saved buffer: the same probe the run had
    sampler = C.sampler_for(args, policy, tok, path, dtype, train_set + eval_set)
    logger = C.RunLogger(args.out, start, args.report_to)
    n, P = args.group_size, args.prompts_per_step

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.run_eval(sampler, tok, eval_set, args)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="poise", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> n rollouts each -> verifiable rewards
        with timer("time_gen"):
            problems = stream.take(P)
            rollouts, correct, no_answer = C.rollouts_scored(sampler, tok, problems, n, args,
                                                             C.rollout_seed(args.seed, step))
        rewards = torch.tensor(correct).view(P, n)  # [N, n], rollouts grouped by prompt

        # 2. the forward pass: features z_i (and log pi_old), then the probe from before this step's refit
        batch = C.collate(rollouts, tok.pad_token_id, dev)
        with timer("time_features"):
            feats, old_logp = features_pass(policy, batch, rollouts, tok, args)  # [B, 2d+3], [B, L]
        use_probe = probe is not None and step > args.rloo_steps
        adv, g, targets, ok, new_rows = cross_rollout_step(rewards, feats, probe, use_probe)  # A, g, t_i: [N, n]
        baseline = rewards - adv
        metrics = {"reward": rewards.mean().item(), "acc": rewards.mean().item(),
                   **C.batch_metrics(rewards.tolist(), adv.flatten(), rollouts, no_answer),
                   "probe_used": float(use_probe), "nonfinite_groups": int((~ok).sum())}
        metrics.update(probe_r=C.pearson(g.flatten(), targets.flatten()) if g is not None else None,
                       probe_mae=float((g - targets).abs().mean()) if g is not None else None)
        if args.oracle_k > 0:  # diagnostic only: the per-prompt baseline and the probe vs a Monte-Carlo p(x)
            p_hat = C.success_rates(sampler, tok, problems, args.oracle_k, args.max_new_tokens, args.temperature,
                                    seed=C.second_seed(args.seed, step))
            metrics["baseline_mse"] = float(np.mean((baseline.mean(-1).numpy() - p_hat) ** 2))
            if g is not None:
                metrics.update(oracle_probe_r=C.pearson(g.mean(-1), p_hat),
                               oracle_probe_mae=float(np.mean(np.abs(g.mean(-1).numpy() - p_hat))))

        # 3. the probe's rows (z_i, t_i) into the buffer; refit from scratch once the warm-up has filled it
        with timer("time_probe"):
            buf_X, buf_y = fifo_append(buf_X, buf_y, *new_rows, args.buffer, n)  # whole finite groups only
            if step >= args.warmup_steps and len(buf_y):
                probe = fit()
        metrics["buffer_rows"] = len(buf_y)

        # 4. policy update with the clipped surrogate (the features pass's log-probs are pi_old)
        sampler.sleep()  # GPU: the engine frees its memory for the update (--vllm-sleep)
        with timer("time_train"):
            adv_tok = adv.flatten()[:, None].to(dev) * batch["response_mask"]  # [B, L]
            metrics.update(C.policy_update(policy, optimizer, batch, adv_tok, args, old_logp=old_logp))
            sampler.sync_weights(policy)

        # 5. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.run_eval(sampler, tok, eval_set, args)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, {"policy": (policy, optimizer)},
                              {"cursor": stream.cursor, "buffer_X": buf_X, "buffer_y": buf_y},
                              keep=args.keep_checkpoints)
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(Args))
