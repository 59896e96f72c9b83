"""POISE: a probe on the policy's own hidden states as the critic, with the cross-rollout baseline.

Paper
  POISE: the policy's own internal states as the value estimator, arXiv 2605.07579 (code: holi-lab/POISE)

What the method is
  PPO's critic is a second network as large as the policy. POISE reads what the policy already computes:
  the hidden states and token entropies of the log-prob forward pass. For rollout i of prompt x,
      z_i = [ mean of the last 10 prompt-token states,                  (layer l, d dims)
              mean of the last 10 response-token states (up to </think>), (layer l, d dims)
              mean token entropy over the response, the reasoning span, the answer span ]   (3)
  and a tiny probe g = ridge(standardise(PCA_32(prompt part), PCA_64(response part), entropies)) predicts
  the prompt's success rate, clipped to [0, 1]. With n >= 2 rollouts per prompt (the release uses 2):
      b_i = 1/(n-1) sum_{j != i} g(z_j)     the baseline reads only the siblings' features
      A_i = r_i - b_i                        no std division
      t_i = 1/(n-1) sum_{j != i} r_j         the probe's training target for row z_i
  z_i carries information about rollout i's own outcome (its answer-span entropy, its final states), so a
  baseline g(z_i) would correlate with r_i and bias the gradient; b_i depends only on the siblings, which
  are independent of y_i given x, so E[b_i grad log pi(y_i|x)] = E[b_i] E[grad log pi(y_i|x)] = 0.
  For the same reason the probe learns t_i (the siblings' rewards), not r_i: g(z_i) estimates p(x).
  The probe is refit from scratch every step on a FIFO buffer of recent rows, after --warmup-steps; the
  first --rloo-steps updates use RLOO (b_i = mean of the siblings' rewards) while rows accumulate, and a
  step's advantages always use the probe from before that step's refit.

Equation -> function
  spans: </think> (or \\boxed) cut ....... response_cuts
  z_i ................................... rollout_features (from common.forward_logprobs' hidden + entropy)
  PCA, standardisation, ridge ........... pca_fit, standardize_fit, ridge_fit; the probe: fit_probe, probe_predict
  b_i, t_i, RLOO (leave-one-out means) .. leave_one_out
  A_i = r_i - b_i ....................... poise_advantages
  FIFO of whole groups .................. fifo_append
  non-finite features (ours) ............ finite_groups, probe_or_rloo

Choices that are ours, not the paper's
  - The features need a no-grad forward over the batch before the update (advantages must exist before the
    loss). verl runs that pass anyway (old log-probs); our trainer skips it when there is one optimizer step
    per batch, so here it is an extra forward (~1/3 of a forward+backward). Its log-probs are passed on as
    pi_old, so --epochs > 1 costs no further pass.
  - Spans without </think> (models that do not think, like the CPU default): the answer span starts at the
    last \\boxed, the reasoning span is what comes before; with neither marker the whole response is
    reasoning and the answer span is empty. An empty span's entropy is 0, as in the release. The response
    states are the last --last-n before and including </think>, else the last --last-n of the response. The
    eos token is not part of the text (the release re-tokenises the decoded text, which has none).
  - --probe-layer 0 picks decoder layer n_layers // 2 + 1 (1-based): 19 of Qwen3-4B's 36, as the release.
  - PCA keeps min(32 or 64, rows - 1, d) components while the buffer is small; a feature with zero spread
    after PCA is left unscaled (std 1) instead of dividing by 0.
  - probe_r / probe_mae: this step's predictions (probe from before the refit) against t_i, the target the
    probe is trained on (the release's regression diagnostics do the same). probe_r is null when either side
    has no spread.
  - A group with a non-finite feature (a bf16 overflow on a GPU, say) stays out of the buffer, where it would
    break every later refit, and takes RLOO's baseline this step (finite_groups, probe_or_rloo); counted in
    nonfinite_groups.
  - CPU defaults: 8 prompts x 2 rollouts (16 rollouts a step; the release: 256 x 2) and 20 steps, so the
    default run keeps the release's warm-up (8) and RLOO (16) schedule and fits ~10 minutes on 2 cores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import common as C
from common import arg


@dataclass
class Args(C.TrainArgs):
    """POISE: a ridge probe on the policy's hidden states and entropies, cross-rollout baseline, no critic."""
    prompts_per_step: int = arg(8, "prompts per step (each gets --group-size rollouts)")
    group_size: int = arg(2, "n: rollouts per prompt (>= 2; the release uses 2)")
    probe_layer: int = arg(0, "decoder layer the probe reads (1-based; 0: n_layers // 2 + 1, 19 for Qwen3-4B)")
    last_n: int = arg(10, "states averaged at the end of the prompt and at the end of the response")
    prompt_pca: int = arg(32, "PCA dims of the prompt states")
    response_pca: int = arg(64, "PCA dims of the response states")
    ridge_alpha: float = arg(100.0, "ridge penalty alpha")
    buffer: int = arg(4096, "probe rows kept (FIFO; the oldest whole groups are dropped)")
    warmup_steps: int = arg(8, "steps of rows collected before the probe is first fit")
    rloo_steps: int = arg(16, "first updates that use RLOO advantages while the probe's rows accumulate")


# ------------------------------------------------------------------------------------------------
# Features: from the hidden states and entropies of the log-prob forward pass
# ------------------------------------------------------------------------------------------------


def response_cuts(tok, rollouts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token positions in each response (eos excluded): (state_end, answer_start, n_text), each [B].
    state_end: the response states used end here (just after the last </think>, else the end of the text);
    answer_start: the answer span is [answer_start, n_text) (after </think>, else from the last \\boxed, else
    empty); the reasoning span is [0, answer_start)."""
    state_end, answer_start, n_text = [], [], []
    for r in rollouts:
        n = max(len(r.ids) - (r.finish == "stop"), min(len(r.ids), 1))  # keep eos only if it is all there is
        pieces = tok.batch_decode([[i] for i in r.ids[:n]]) if n else []
        ends = np.cumsum([len(p) for p in pieces])  # [n] character offset where each token ends
        text = "".join(pieces)
        tok_at = lambda c: int(np.searchsorted(ends, c, side="right"))  # noqa: E731  token holding character c
        think = text.rfind("</think>")
        boxed = text.rfind("\\boxed")
        if think >= 0:
            end = start = tok_at(think + len("</think>") - 1) + 1  # just after the token closing </think>
        else:
            end, start = n, (tok_at(boxed) if boxed >= 0 else n)
        state_end.append(end)
        answer_start.append(start)
        n_text.append(n)
    return np.array(state_end), np.array(answer_start), np.array(n_text)


def span_mean(x: torch.Tensor, start, end) -> torch.Tensor:
    """x: [B, T, ...]; mean over positions [start_b, end_b) of each row; 0 for an empty span. -> [B, ...]"""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)[None, :]
    m = ((pos >= torch.as_tensor(start, device=x.device)[:, None]) &
         (pos < torch.as_tensor(end, device=x.device)[:, None])).to(x.dtype)  # [B, T]
    m = m.view(*m.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def rollout_features(hidden, entropy, prompt_len: int, prompt_lens, cuts, last_n: int = 10) -> np.ndarray:
    """z_i for each row: hidden [B, P+L, d] (prompt left-padded to P), entropy [B, L], prompt_lens [B] (real
    prompt tokens), cuts = response_cuts(...). -> [B, 2d + 3] float32:
    [mean of the last n prompt states | mean of the last n response states | H_all, H_reasoning, H_answer]."""
    state_end, answer_start, n_text = (torch.as_tensor(c) for c in cuts)
    answer_start = torch.minimum(answer_start, n_text)
    P = prompt_len
    p_start = P - torch.as_tensor(prompt_lens).clamp(max=last_n)
    prompt_part = span_mean(hidden.float(), p_start, torch.full_like(p_start, P))  # [B, d]
    r_end = P + state_end
    response_part = span_mean(hidden.float(), (r_end - last_n).clamp(min=P), r_end)  # [B, d]
    ent = entropy.float()
    zeros = torch.zeros_like(n_text)
    h = torch.stack([span_mean(ent, zeros, n_text), span_mean(ent, zeros, answer_start),
                     span_mean(ent, answer_start, n_text)], -1)  # [B, 3]: whole, reasoning, answer
    return torch.cat([prompt_part, response_part, h], -1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def features_pass(policy, batch: dict, rollouts, tok, args) -> tuple[np.ndarray, torch.Tensor]:
    """The log-prob forward pass, without autograd, in micro-batches: (z [B, 2d+3], log pi_old [B, L])."""
    cuts, B = response_cuts(tok, rollouts), len(rollouts)
    prompt_lens = np.array([len(r.prompt_ids) for r in rollouts])
    feats, logp = [], []
    for s in range(0, B, args.micro_batch_size):
        rows = slice(s, s + args.micro_batch_size)
        out = C.forward_logprobs(policy, C.slice_batch(batch, rows), args.temperature, args.logp_chunk,
                                 entropy=True, hidden_layer=args.probe_layer)
        feats.append(rollout_features(out["hidden"], out["entropy"], batch["prompt_len"], prompt_lens[rows],
                                      tuple(c[rows] for c in cuts), args.last_n))
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
    """Column mean and std of X [N, d]; a column with no spread keeps std 1 (it becomes 0, not NaN)."""
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


def pearson(a, b) -> float:
    """Pearson correlation of two [N] arrays; NaN (logged as null) when either has no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


def main(args: Args):
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: POISE's cross-rollout baseline needs >= 2 rollouts")
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype)
    n_layers = policy.config.num_hidden_layers
    args.probe_layer = args.probe_layer or n_layers // 2 + 1
    if not 1 <= args.probe_layer <= n_layers:
        raise SystemExit(f"--probe-layer {args.probe_layer}: {args.model} has decoder layers 1..{n_layers}")
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
    sampler = C.make_sampler(args.sampler, policy, tok, path, dtype, args.seed)
    logger = C.RunLogger(args.out, resume_step=start)
    n, P = args.group_size, args.prompts_per_step

    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc="poise", initial=start, total=args.steps):
        timer, t0 = C.Timer(), time.perf_counter()
        # 1. problems -> n rollouts each -> verifiable rewards
        with timer("time_gen"):
            probs = stream.take(P)
            roll = sampler.generate([C.build_prompt(tok, p) for p in probs], n, args.max_new_tokens,
                                    args.temperature, seed=args.seed * 1_000_003 + step * 101)
            correct, no_answer = C.score([r.text for r in roll], [probs[r.prompt_idx].answer for r in roll])
        rewards = torch.tensor(correct).view(P, n)  # [N, n], rollouts grouped by prompt

        # 2. the forward pass: features z_i (and log pi_old), then the probe from before this step's refit
        batch = C.collate(roll, tok.pad_token_id, dev)
        with timer("time_features"):
            feats, old_logp = features_pass(policy, batch, roll, tok, args)  # [B, 2d+3], [B, L]
        targets = leave_one_out(rewards)  # t_i: [N, n]
        ok = finite_groups(feats, n)  # [N]: groups whose features can enter the probe
        g = torch.tensor(probe_predict(probe, feats), dtype=torch.float32).view(P, n) if probe is not None else None
        if g is not None:
            g = probe_or_rloo(g, rewards, torch.from_numpy(ok))
        use_probe = g is not None and step > args.rloo_steps
        adv = poise_advantages(rewards, g if use_probe else None)  # [N, n]
        baseline = rewards - adv
        metrics = {"reward": rewards.mean().item(), "acc": rewards.mean().item(), "adv_std": adv.std().item(),
                   "frac_reward_zero_std": (rewards.max(-1).values == rewards.min(-1).values).float().mean().item(),
                   "rollouts": len(roll), "tokens": int(batch["response_mask"].sum()), "no_answer": no_answer,
                   "resp_len": batch["response_mask"].sum(-1).mean().item(), "probe_used": float(use_probe),
                   "nonfinite_groups": int((~ok).sum())}
        metrics.update(probe_r=pearson(g.flatten(), targets.flatten()) if g is not None else None,
                       probe_mae=float((g - targets).abs().mean()) if g is not None else None)
        if args.oracle_k > 0:  # diagnostic only: the per-prompt baseline and the probe vs a Monte-Carlo p(x)
            p_hat = C.success_rates(sampler, tok, probs, args.oracle_k, args.max_new_tokens, args.temperature,
                                    seed=args.seed * 7_919 + step)
            metrics["baseline_mse"] = float(np.mean((baseline.mean(-1).numpy() - p_hat) ** 2))
            if g is not None:
                metrics.update(oracle_probe_r=pearson(g.mean(-1), p_hat),
                               oracle_probe_mae=float(np.mean(np.abs(g.mean(-1).numpy() - p_hat))))

        # 3. the probe's rows (z_i, t_i) into the buffer; refit from scratch once the warm-up has filled it
        with timer("time_probe"):
            rows = np.repeat(ok, n)  # [B]: whole finite groups only
            buf_X, buf_y = fifo_append(buf_X, buf_y, feats[rows], targets.flatten().numpy()[rows], args.buffer, n)
            if step >= args.warmup_steps and len(buf_y):
                probe = fit()
        metrics["buffer_rows"] = len(buf_y)

        # 4. policy update with the clipped surrogate (the features pass's log-probs are pi_old)
        with timer("time_train"):
            adv_tok = adv.flatten()[:, None].to(dev) * batch["response_mask"]  # [B, L]
            metrics.update(C.policy_update(policy, optimizer, batch, adv_tok, args, old_logp=old_logp))
            sampler.sync_weights(policy)

        # 5. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, {"policy": (policy, optimizer)},
                              {"cursor": stream.cursor, "buffer_X": buf_X, "buffer_y": buf_y})
    return logger.path


if __name__ == "__main__":
    main(C.parse_args(Args))
