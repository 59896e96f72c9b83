"""The data behind notebooks/: every method's baseline and the policy-gradient pieces, on one policy's real rollouts.

One fixed policy (the default smollm2-135m), --prompts held-out arith:test problems, and for each:
  pool      --pool rollouts in the order drawn: what the methods spend (a group of G is the first G of them,
            V0.5 draws from it in order)
  oracle    --oracle-k further rollouts, never shown to any method: the Monte-Carlo p(x) everything is scored on
  grad      for every pool rollout, the gradient of sum_t log pi(y_t | x, y_<t) with respect to a fixed
            parameter subset, the gain of the final RMSNorm (d = 576 numbers). A policy-gradient estimate with
            any advantage is then sum_i A_i grad_i / n: the notebooks resample rollouts and compare methods'
            gradient variance in numpy, in seconds, without the model. (Ours: one subset is a projection of the
            full gradient; this one needs only the lm head's backward, not the decoder's.)
  v0        V0's p(x) (pretrained/v0-smollm2-arith), in context of the shipped history of this same policy
  probe     POISE's g(z_i) for every pool rollout: the probe (poise.fit_probe, the paper's PCA 32/64 + ridge
            100 on poise's default layer's states and entropies) fitted on --train-prompts x 2 rollouts of arith
            (train split),
            target = the sibling's reward, as poise.py does
  ppo       V(s_0) of a PPO critic (ppo.py's ValueModel and targets) trained for --critic-epochs on those same
            training rollouts of this policy (as benchmarks/poise_vs_critic.py): PPO's baseline at the prompt
  dvpo      V(s_0) of DVPO's frozen global value model, if --dvpo-gvm names one (python dvpo.py pretrain)
  genac     GenAC's critic at s_0, the mean of 4 answers to genac.py's ICC prompt (parsed, with its fallback), if
            --genac-critic names one (genac.py's pretrain stage: trained on this same base policy)
All values on the 0/1 reward scale. Written as one .npz (numbers) + one .json (questions, settings, timings).

    python benchmarks/baseline_data.py --dvpo-gvm runs/dvpo_gvm/gvm --genac-critic runs/genac_default/pretrain/ckpt/critic
    # -> notebooks/data/baselines.npz, notebooks/data/baselines.json
    python benchmarks/baseline_data.py --refresh-dvpo --dvpo-gvm runs/dvpo_default/gvm   # a new GVM: its column only
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import poise  # noqa: E402
import ppo  # noqa: E402
import v0 as V0  # noqa: E402


def grouped(rollouts, rewards, n_prompts: int, per_prompt: int):
    """Sampler output (any order) -> rollouts [N][n] in the order drawn, and 0/1 rewards [N, n]."""
    rows, r = [[] for _ in range(n_prompts)], [[] for _ in range(n_prompts)]
    for x, c in zip(rollouts, rewards):
        rows[x.prompt_idx].append(x)
        r[x.prompt_idx].append(c)
    assert all(len(g) == per_prompt for g in rows)
    return rows, np.array(r, dtype=np.int8)


@torch.no_grad()
def norm_gain_grads(policy, batch: dict, temperature: float, hidden_layer: int | None = None) -> tuple[torch.Tensor, dict]:
    """Per-rollout gradient of sum_t log pi(y_t) with respect to the final RMSNorm's gain w, from one forward pass
    (common.forward_logprobs, which also returns the token entropies and, if asked, a layer's states for POISE).
    The norm's output is h_t = w * xhat_t (xhat_t: the normalised last-layer state), so
        d/dw sum_t log pi(y_t) = sum_t (d log pi(y_t) / d h_t) * xhat_t,
    exact per rollout because rollouts do not interact in the lm head. -> (grads [B, d], forward_logprobs' dict)"""
    base, head = policy.get_decoder(), policy.get_output_embeddings()
    got = {}
    hook = base.norm.register_forward_hook(lambda mod, inp, out: got.__setitem__("x", inp[0]))
    try:
        out = C.forward_logprobs(policy, batch, temperature, entropy=True, hidden_layer=hidden_layer)
    finally:
        hook.remove()
    P, L = batch["prompt_len"], batch["response_ids"].shape[1]
    x = got["x"][:, P - 1:P + L - 1].float()  # [B, L, d]: the states that predict response token t
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + base.norm.variance_epsilon)
    with torch.enable_grad():
        h = (base.norm.weight.float() * xhat).detach().requires_grad_(True)  # [B, L, d], a leaf
        logits = h @ head.weight.float().T / temperature  # [B, L, V]
        logp = logits.log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0]  # [B, L]
        (logp * batch["response_mask"]).sum().backward()
    m = batch["response_mask"]
    out["check"] = float(((logp.detach() - out["logp"]).abs() * m).max()) if m.any() else 0.0
    return (h.grad * xhat).sum(1), out


def critic_at_start(critic, batch: dict, micro: int) -> np.ndarray:
    """V(s_0): the value at the state before the first response token (the prompt alone). -> [B]"""
    return ppo.critic_values(critic, batch, micro)[:, 0].numpy()


def prompt_batch(tok, questions: list[str]) -> dict:
    """The prompts alone, each with a one-token response: all V(s_0) reads (the state before the first token)."""
    rows = [C.Rollout(i, C._prompt_ids(tok, C.build_prompt(tok, C.Problem("", q, ""))), [tok.eos_token_id], "", [0.0],
                      "stop") for i, q in enumerate(questions)]
    return C.collate(rows, tok.pad_token_id)


def refresh_dvpo(a):
    """--refresh-dvpo: the DVPO column of the --out file recomputed for --dvpo-gvm, every other number kept."""
    import dvpo
    from transformers import AutoTokenizer
    missing = [f for f in (a.out + ".json", a.out + ".npz") if not Path(f).exists()]
    if missing:
        raise SystemExit(f"--refresh-dvpo: {missing[0]} not found; make the data first (without --refresh-dvpo)")
    meta = json.loads(Path(a.out + ".json").read_text())
    with np.load(a.out + ".npz") as f:
        out = dict(f)
    tok = AutoTokenizer.from_pretrained(C.resolve_model(meta["settings"]["model"]))
    gvm, _ = dvpo.load_gvm(a.dvpo_gvm, tok, "cpu", torch.float32)
    out["dvpo"] = critic_at_start(gvm, prompt_batch(tok, meta["questions"]), a.micro).astype(np.float32)
    np.savez_compressed(a.out + ".npz", **out)
    meta["settings"]["dvpo_gvm"] = a.dvpo_gvm
    meta["dvpo_refreshed_by"] = "python benchmarks/baseline_data.py " + " ".join(sys.argv[1:])
    Path(a.out + ".json").write_text(json.dumps(meta, indent=1))
    print(f"  dvpo: MSE against p(x) {np.mean((out['dvpo'] - out['p_oracle']) ** 2):.4f} (the rest of {a.out} kept)")


def genac_values(folder: str, policy_name: str, n_params: int, rate: float, questions: list[str], max_new: int,
                 samples: int, seed: int) -> tuple[np.ndarray, int]:
    """GenAC's critic at s_0 (nothing written yet), asked as genac.py asks it (ICC facts: the actor, its success
    rate `rate`, its whole budget left): the mean of `samples` answers, an unparsable one taking the ICC rate
    as genac.py's fallback does. -> (values [N], unparsable answers)"""
    import genac
    model, ctok, path = C.load_model(folder)
    sampler = C.make_sampler("hf", model, ctok, path, torch.float32, seed)  # short answers: no second vLLM engine
    ga = genac.Args(max_new_tokens=max_new)
    states = [genac.State(q, "", max_new) for q in questions for _ in range(samples)]
    vals, parsed, _ = genac.query_critic(sampler, ctok, states, ga, (policy_name, n_params), rate, seed)
    return vals.view(len(questions), samples).mean(1).numpy(), int((~parsed).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64, help="held-out arith:test problems")
    ap.add_argument("--pool", type=int, default=16, help="rollouts per prompt the methods may spend")
    ap.add_argument("--oracle-k", type=int, default=32, help="further rollouts per prompt for the Monte-Carlo p(x)")
    ap.add_argument("--train-prompts", type=int, default=96, help="arith (train) prompts x 2 rollouts for the "
                    "probe and the PPO critic")
    ap.add_argument("--critic-epochs", type=int, default=2)
    ap.add_argument("--critic-lr", type=float, default=1e-4)
    ap.add_argument("--v0", default=V0.PRETRAINED)
    ap.add_argument("--dvpo-gvm", default="", help="DVPO's value model folder (python dvpo.py pretrain)")
    ap.add_argument("--genac-critic", default="", help="GenAC's critic folder (genac.py's pretrain stage)")
    ap.add_argument("--refresh-dvpo", action="store_true", help="only recompute the DVPO column of the --out files "
                    "for a new --dvpo-gvm (V(s_0) reads the prompts alone), keeping every other number")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "notebooks" / "data" / "baselines"))
    a = ap.parse_args()
    if a.refresh_dvpo:
        if not a.dvpo_gvm:
            raise SystemExit("--refresh-dvpo needs --dvpo-gvm DIR (a folder written by python dvpo.py pretrain)")
        return refresh_dvpo(a)
    t0, times = time.perf_counter(), {}
    lap = lambda name: times.__setitem__(name, round(time.perf_counter() - t0 - sum(times.values()), 1))  # noqa: E731
    C.seed_everything(a.seed)
    policy, tok, path = C.load_model(a.model)
    policy.eval()
    sampler = C.make_sampler("auto", policy, tok, path, torch.float32, a.seed)
    layer, d = poise.probe_layer_index(-1, policy.config.num_hidden_layers), policy.config.hidden_size  # model.layers[l]
    pa = poise.Args(model=a.model, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                    probe_layer=layer, micro_batch_size=a.micro)

    def sample(problems, n, seed):
        roll = sampler.generate([C.build_prompt(tok, p) for p in problems], n, a.max_new_tokens, a.temperature, seed=seed)
        r, na = C.score([x.text for x in roll], [problems[x.prompt_idx].answer for x in roll])
        return (*grouped(roll, r, len(problems), n), na)

    # 1. held-out prompts: the pool the methods spend, and the oracle nobody sees
    held = C.load_problems("arith:test", a.prompts)
    pool, r_pool, na_pool = sample(held, a.pool, C.rollout_seed(a.seed, 0, 11))
    _, r_oracle, _ = sample(held, a.oracle_k, C.rollout_seed(a.seed, 0, 13))
    p_oracle = r_oracle.mean(1)
    lap("sample")
    print(f"sampled {a.prompts} x ({a.pool} + {a.oracle_k}); p(x) mean {p_oracle.mean():.3f} ({times['sample']} s)",
          flush=True)

    # 2. per-rollout gradients and POISE features of the pool, in micro-batches
    flat = [x for g in pool for x in g]
    grads, feats, max_err = [], [], 0.0
    prompt_lens = np.array([len(x.prompt_ids) for x in flat])
    for s in range(0, len(flat), a.micro):
        rows = flat[s:s + a.micro]
        batch = C.collate(rows, tok.pad_token_id)
        g, fw = norm_gain_grads(policy, batch, a.temperature, layer + 1)  # forward_logprobs counts layers from 1
        feats.append(poise.rollout_features(fw["hidden"], fw["entropy"], batch["prompt_len"], prompt_lens[s:s + a.micro],
                                            poise.response_spans(tok, rows, batch["response_ids"].shape[1]), pa.last_n))
        grads.append(g.numpy())
        max_err = max(max_err, fw["check"])
    if max_err > 1e-3:
        raise RuntimeError(f"the gradient pass's log-probs differ from common.forward_logprobs by {max_err:.2e}")
    grads = np.concatenate(grads).reshape(a.prompts, a.pool, d).astype(np.float32)
    feats = np.concatenate(feats)
    lap("grads_and_features")
    print(f"gradients and features of {len(flat)} rollouts (log-prob check {max_err:.1e}; {times['grads_and_features']} s)",
          flush=True)

    # 3. V0's prior, in context of this policy's shipped history
    vm, bb = V0.load_v0(a.v0)
    folder = V0.v0_folder(a.v0)
    prompts = json.loads((folder / "prompt_dict.json").read_text())
    ctx = V0.read_rows(folder / "context.jsonl", prompts)
    v0_prior = V0.predict(vm, bb, [prompts[V0.prompt_key(r)] for r in ctx], [V0.success_rate(r["score"]) for r in ctx],
                          [p.question for p in held])
    lap("v0")

    # 4. training rollouts of this policy: POISE's probe and PPO's critic learn from the same ones
    train = C.ProblemStream(C.load_problems("arith"), a.seed).take(a.train_prompts)
    t_roll, t_r, _ = sample(train, 2, C.rollout_seed(a.seed, 0, 17))
    t_flat = [x for g in t_roll for x in g]
    t_batch = C.collate(t_flat, tok.pad_token_id)
    t_feats, _ = poise.features_pass(policy, t_batch, t_flat, tok, pa)
    probe = poise.fit_probe(t_feats, poise.leave_one_out(torch.tensor(t_r, dtype=torch.float32)).flatten().numpy(), d,
                            pa.prompt_pca, pa.response_pca, pa.ridge_alpha)
    g_probe = poise.probe_predict(probe, feats).reshape(a.prompts, a.pool)
    lap("probe")
    critic = ppo.ValueModel(copy.deepcopy(policy))
    opt = C.adamw(critic.parameters(), a.critic_lr)
    ca = ppo.Args(seed=a.seed, minibatch_size=32, micro_batch_size=a.micro)
    ppo.fit_critic(critic, opt, t_batch, torch.tensor(t_r, dtype=torch.float32).flatten(), ca, a.critic_epochs,
                   log=lambda epoch, st: print(f"PPO critic epoch {epoch + 1}: value_loss {st['value_loss']:.4f}",
                                               flush=True))
    first = C.collate([g[0] for g in pool], tok.pad_token_id)  # V(s_0) reads the prompt only: any rollout will do
    ppo_v = critic_at_start(critic, first, a.micro)
    del critic, opt
    lap("ppo_critic")

    out = dict(rewards=r_pool, p_oracle=p_oracle, oracle_k=np.int64(a.oracle_k), grads=grads, v0=v0_prior,
               probe=g_probe.astype(np.float32), ppo=ppo_v.astype(np.float32),
               train_success=np.float32(t_r.mean()))
    if a.dvpo_gvm:
        import dvpo
        gvm, _ = dvpo.load_gvm(a.dvpo_gvm, tok, "cpu", torch.float32)
        out["dvpo"] = critic_at_start(gvm, first, a.micro).astype(np.float32)
        lap("dvpo")
    if a.genac_critic:
        n_params = sum(x.numel() for x in policy.parameters())
        out["genac"], unparsable = genac_values(a.genac_critic, a.model, n_params, float(t_r.mean()),
                                                [p.question for p in held], a.max_new_tokens, 4, a.seed)
        out["genac"] = out["genac"].astype(np.float32)
        lap("genac")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out + ".npz", **out)
    meta = {"command": "python benchmarks/baseline_data.py " + " ".join(sys.argv[1:]), "settings": vars(a),
            "questions": [p.question for p in held], "answers": [p.answer for p in held],
            "no_answer_pool": na_pool, "probe_layer": layer, "seconds": times,
            "genac_unparsable": unparsable if a.genac_critic else None}
    Path(a.out + ".json").write_text(json.dumps(meta, indent=1))
    for k in ("v0", "probe", "ppo", "dvpo", "genac"):
        if k in out:
            est = out[k] if out[k].ndim == 1 else out[k].mean(1)
            print(f"{k:>6}: MSE against p(x) {np.mean((est - p_oracle) ** 2):.4f}")
    print(f"wrote {a.out}.npz and .json ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
