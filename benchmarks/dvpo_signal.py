"""DVPO's paper reward setting: does the advantage its frozen GVM gives point at the correct responses?

In the paper's setting (dvpo.py --variant paper) the verifier's outcome never reaches stage 2: the KL penalty is the
only reward, so the task signal the policy gets is the GVM's values along its responses (dvpo.py's docstring:
A_t = (1 - lambda) sum_{m>=1} lambda^(m-1) V_{t+m} - V_t). At step 1 the policy is its own reference, so the KL
reward is 0 and the advantages are the GVM's alone. For one policy (--model) and one GVM (--gvm), on the first
--problems prompts of stage 2's stream (--data, --seed) x --n rollouts, this computes the advantages stage 2's first
update would use under each setting in SETTINGS (dvpo.dvpo_rewards, response_values, dvpo_advantages), and for each:
  auc      AUC of each response's mean advantage against its verifier outcome: 0.5 is no task signal; a policy
           gradient pushes up the responses whose advantage is high, so auc < 0.5 teaches the wrong answers
  len_r    Pearson r of a response's mean advantage with its length (< 0: shorter responses are pushed up)
  eos_adv  the mean advantage at the last token of the responses that stopped (> 0: stopping there is pushed up)
with 95% intervals from --boot bootstrap resamples of the prompts, and the GVM's own AUC (V(s_0) against the
outcome), its mean value, and its mean value before the last token of the correct and of the wrong responses (raw
and whitened per row: the last step's delta is -V there, since the value after the last token is 0). Writes
OUT/signal.json.

    python benchmarks/dvpo_signal.py --gvm runs/dvpo_default/gvm   # the GVM of python dvpo.py --out runs/dvpo_default
    python benchmarks/dvpo_signal.py --gvm DIR --problems 32 --n 2   # quicker

Choices that are ours: the three measures, the settings, the bootstrap over prompts.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import dvpo  # noqa: E402
from common import arg  # noqa: E402

SETTINGS = {  # name: (the reward dvpo_rewards adds, values whitened per row, lambda)
    "rlvr (dvpo.py's default)": ("rlvr", False, 1.0),
    "paper (official)": ("paper", True, 0.95),
    "paper, raw values": ("paper", False, 0.95),
    "paper, lambda 0.8": ("paper", True, 0.8),
    "paper, lambda 1 (A_t = -V_t)": ("paper", True, 1.0),
    "paper + the outcome": ("rlvr", True, 0.95),
}


@dataclass
class SignalArgs(dvpo.Args):
    """DVPO: the task signal in stage 2's first advantages under each reward setting, for one frozen GVM."""
    out: str = arg("runs/dvpo_signal", "folder for signal.json")
    problems: int = arg(128, "prompts from the start of stage 2's stream (--data, --seed)")
    n: int = arg(4, "rollouts per prompt")
    boot: int = arg(1000, "bootstrap resamples of the prompts for the 95% intervals")


def response_signal(adv, mask, correct, stopped) -> dict:
    """adv, mask [B, L]; correct, stopped [B] -> per response: mean advantage, length, last token's advantage."""
    length = mask.sum(-1)  # [B]
    last = adv[torch.arange(len(adv)), length.long().clamp(min=1) - 1]  # [B]
    return {"mean_adv": ((adv * mask).sum(-1) / length.clamp(min=1)).numpy(), "length": length.numpy(),
            "last_adv": last.numpy(), "correct": correct.numpy() > 0.5, "stopped": stopped}


def measures(sig: dict, rows) -> dict:
    """The three measures on the responses `rows` (indices into sig's [B] arrays)."""
    s = {k: v[rows] for k, v in sig.items()}
    return {"auc": C.roc_auc(s["mean_adv"], s["correct"]), "len_r": C.pearson(s["mean_adv"], s["length"]),
            "eos_adv": float(s["last_adv"][s["stopped"]].mean()) if s["stopped"].any() else float("nan")}


def with_intervals(sig: dict, n_prompts: int, n: int, boot: int, seed: int) -> dict:
    """Each measure on all responses, and its 2.5% and 97.5% quantiles over prompt-level bootstrap resamples."""
    rng = np.random.default_rng(seed)
    point = measures(sig, np.arange(n_prompts * n))
    draws = []
    for _ in range(boot):
        prompts = rng.integers(0, n_prompts, n_prompts)  # [P] prompts drawn with replacement
        draws.append(measures(sig, (prompts[:, None] * n + np.arange(n)).ravel()))  # their responses, grouped
    return {k: [v, *np.nanquantile([d[k] for d in draws], [0.025, 0.975]).tolist()] for k, v in point.items()}


def main(args: SignalArgs):
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype, args.thinking)
    policy.eval()
    gvm, _ = dvpo.load_gvm(args.gvm, tok, dev, dtype)
    problems = C.ProblemStream(C.load_problems(args.data), args.seed).take(args.problems)
    sampler = C.sampler_for(args, policy, tok, path, dtype, problems)
    rollouts, correct, _ = C.rollouts_scored(sampler, tok, problems, args.n, args, C.rollout_seed(args.seed, 1))
    correct = torch.tensor(correct)  # [B], grouped by prompt
    stopped = np.array([r.finish == "stop" for r in rollouts])
    batch = C.collate(rollouts, tok.pad_token_id, dev)
    mask = batch["response_mask"]
    v_all = dvpo.gvm_all_values(gvm, batch, args.micro_batch_size)  # [B, P+L]
    raw = dvpo.response_values(v_all, batch)  # [B, L]
    last = mask.sum(-1).long().clamp(min=1) - 1  # [B] the state before each response's last token
    at_end = {"raw": raw, "whitened": dvpo.response_values(v_all, batch, whiten=True)}
    res = {"gvm": args.gvm, "model": args.model, "problems": args.problems, "n": args.n,
           "success_rate": float(correct.mean()), "gvm_auc_s0": C.roc_auc(raw[:, 0].cpu().numpy(), correct > 0.5),
           "mean_length": float(mask.sum(-1).mean()), "value_mean": C.masked_mean(raw, mask).item(),
           "last_value": {f"{k}, {o}": float(v[torch.arange(len(v)), last].cpu()[correct == c].mean())
                          for k, v in at_end.items() for o, c in (("correct", 1), ("wrong", 0))}, "settings": {}}
    print(f"{len(rollouts)} rollouts, success rate {res['success_rate']:.3f}, mean length {res['mean_length']:.1f}; "
          f"the GVM's V(s_0) AUC {res['gvm_auc_s0']:.3f}, mean V {res['value_mean']:.3f}; mean V before the last "
          "token: " + ", ".join(f"{k} {v:+.3f}" for k, v in res["last_value"].items()), flush=True)
    for name, (variant, whiten, lam) in SETTINGS.items():
        rewards = dvpo.dvpo_rewards(correct.to(dev), mask, variant)  # the KL reward is 0 at step 1
        adv = dvpo.dvpo_advantages(dvpo.response_values(v_all, batch, whiten), rewards, mask, args.gamma, lam,
                                   args.whiten_adv)  # [B, L]
        m = with_intervals(response_signal(adv.cpu(), mask.cpu(), correct, stopped), args.problems, args.n,
                           args.boot, args.seed)
        res["settings"][name] = m
        print(f"{name:<30} " + "  ".join(f"{k} {v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (v, lo, hi) in m.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with C.atomic_file(out / "signal.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(C.parse_args(SignalArgs))
