"""POISE's probe vs PPO's critic as value estimators, on held-out prompts, for one policy and the same data.

The paper's claim (Qwen3-4B, held-out DAPO-Math prompts): probe Pearson r 0.870 vs 0.676 for a fine-tuned
critic of the policy's size. Here, for one fixed policy (--model):
  training data  --train-prompts prompts x 2 rollouts, seen by both estimators
  probe          poise.fit_probe on the rows (z_i, t_i) of those rollouts (t_i: the sibling's reward), with
                 poise.py's default features (model.layers[n_layers // 2 + 1], poise.py's spans)
  critic         ppo.py's critic: ppo.ValueModel, a copy of the policy with a zero-initialised value head,
                 trained on the same rollouts with ppo.py's targets (GAE returns, gamma 1, lambda 0.95, values
                 recomputed each pass, clipped value loss, lr 1e-4, mini-batches of 32) for --critic-epochs
  held out       --heldout prompts of arith:test; p(x) from --oracle-k fresh rollouts; the probe predicts from
                 2 other rollouts (the mean of g over them: it reads responses), the critic from the prompt alone
                 (V at the first response token, ppo.py's baseline)
Prints Pearson r and MAE against p(x) for the probe, the critic and the constant training mean; with several
--seeds (each: other training prompts, rollouts and mini-batch order, other p(x) samples; the same held-out
prompts), their means with a 95% Student's t interval over seeds, and the paired difference probe - critic. Each
seed's numbers go to OUT/seed<k>.json as it finishes; a seed already there is read, not re-run (resumable),
once its settings are checked against these.

    python benchmarks/poise_vs_critic.py                  # 3 seeds, 128 held-out prompts (docs/poise.md#results)
    python benchmarks/poise_vs_critic.py --seeds 0        # one of them
    python benchmarks/poise_vs_critic.py --out benchmarks/data/poise_vs_critic   # the committed results, read back
    python benchmarks/poise_vs_critic.py --model runs/poise_default/ckpt/policy
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import poise  # noqa: E402
import ppo  # noqa: E402
from compare import seed_results, t_interval  # noqa: E402  (benchmarks/compare.py: seed files, Student's t)


SETTINGS = ("model", "train_prompts", "heldout", "oracle_k", "critic_epochs", "critic_lr", "max_new_tokens",
            "temperature")  # what a seed's numbers depend on, bar the seed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=128)
    ap.add_argument("--oracle-k", type=int, default=12)
    ap.add_argument("--critic-epochs", type=int, default=3)
    ap.add_argument("--critic-lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--out", default="runs/poise_vs_critic", help="folder: seed<k>.json per seed, summary.json")
    a = ap.parse_args(argv)
    results = seed_results(a, SETTINGS, one_seed)
    summary = summarise(results)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    if len(results) > 1:  # one seed has no interval
        print(f"over seeds {a.seeds} (mean [95% t interval]):")
        for name, v in summary.items():
            print(f"{name:>16}: " + " ".join(f"{k}={m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (m, lo, hi) in v.items()))
    return summary


def summarise(results: list[dict]) -> dict:
    """Each estimator's r and MAE over seeds, and the paired difference probe - critic (the paper: > 0 for r)."""
    both, mae = ("pearson_r", "mae"), ("mae",)  # a constant has no correlation
    summary = {name: {k: t_interval([res[name][k] for res in results]) for k in keys}
               for name, keys in (("probe", both), ("critic", both), ("train mean", mae))}
    summary["probe - critic"] = {k: t_interval([res["probe"][k] - res["critic"][k] for res in results])
                                 for k in ("pearson_r", "mae")}
    return summary


def one_seed(a) -> dict:
    """One seed's measurement: the estimators' Pearson r and MAE against p(x) on the held-out prompts."""
    t0 = time.perf_counter()
    C.seed_everything(a.seed)
    policy, tok, path = C.load_model(a.model)
    policy.eval()
    sampler = C.make_sampler("auto", policy, tok, path, torch.float32, a.seed)
    pa = poise.Args(model=a.model, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    d = policy.config.hidden_size

    def rollouts(problems, seed):
        roll = sampler.generate([C.build_prompt(tok, p) for p in problems], 2, a.max_new_tokens, a.temperature,
                                seed=seed)
        r, _ = C.score([x.text for x in roll], [problems[x.prompt_idx].answer for x in roll])
        return roll, torch.tensor(r).view(len(problems), 2), C.collate(roll, tok.pad_token_id)

    # 1. the training rollouts, shared by both estimators
    train = C.ProblemStream(C.load_problems("arith"), a.seed).take(a.train_prompts)
    roll, rewards, batch = rollouts(train, C.rollout_seed(a.seed, 0, 1))
    feats, _ = poise.features_pass(policy, batch, roll, tok, pa)
    probe = poise.fit_probe(feats, poise.leave_one_out(rewards).flatten().numpy(), d, pa.prompt_pca,
                            pa.response_pca, pa.ridge_alpha)
    print(f"train: {len(roll)} rollouts, success rate {rewards.mean():.3f}; probe fit ({time.perf_counter() - t0:.0f} s)",
          flush=True)

    critic = ppo.ValueModel(copy.deepcopy(policy))
    opt = torch.optim.AdamW(critic.parameters(), lr=a.critic_lr, weight_decay=0.0)
    ca = ppo.Args(seed=a.seed, minibatch_size=32, micro_batch_size=16)
    ppo.fit_critic(critic, opt, batch, rewards.flatten(), ca, a.critic_epochs,
                   log=lambda epoch, st: print(f"critic epoch {epoch + 1}: value_loss {st['value_loss']:.4f} "
                                               f"({time.perf_counter() - t0:.0f} s)", flush=True))

    # 2. held-out prompts: the Monte-Carlo truth, and each estimator's prediction
    held = C.load_problems("arith:test", a.heldout)
    p_hat = C.success_rates(sampler, tok, held, a.oracle_k, a.max_new_tokens, a.temperature, seed=C.second_seed(a.seed, 5))
    h_roll, _, h_batch = rollouts(held, C.rollout_seed(a.seed, 0, 2))
    h_feats, _ = poise.features_pass(policy, h_batch, h_roll, tok, pa)
    pred = {"probe": poise.probe_predict(probe, h_feats).reshape(len(held), 2).mean(1),
            "critic": ppo.critic_values(critic, h_batch, ca.micro_batch_size)[:, 0].view(len(held), 2).mean(1).numpy(),
            "train mean": np.full(len(held), rewards.mean().item())}
    res = {"model": a.model, "seed": a.seed, "train_rollouts": len(roll), "heldout": len(held), "oracle_k": a.oracle_k,
           "heldout_p_mean": float(p_hat.mean()), "seconds": round(time.perf_counter() - t0)}
    print(f"seed {a.seed}, held-out: {len(held)} prompts, p(x) from {a.oracle_k} rollouts, mean {p_hat.mean():.3f}")
    for name, v in pred.items():
        r = C.pearson(v, p_hat)
        res[name] = {"pearson_r": r if np.isfinite(r) else None, "mae": float(np.mean(np.abs(v - p_hat)))}
        print(f"{name:>10}: r={r:.3f} mae={res[name]['mae']:.3f}")
    return res


if __name__ == "__main__":
    main()
