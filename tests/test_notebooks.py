"""The notebooks' data and the notebooks themselves: the per-rollout gradient identity behind
gradient_variance.ipynb, the resampling estimators, and both notebooks executed headless on the committed data."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import baseline_data  # noqa: E402
from baseline_data import norm_gain_grads  # noqa: E402


def test_norm_gain_grads_match_autograd_per_rollout(tiny_lm):
    """d/dw sum_t log pi(y_t) for the final norm's gain, from one batched no-grad pass, equals autograd run on each
    rollout alone; the pass also returns forward_logprobs' entropies and layer states (POISE's features)."""
    g = torch.Generator().manual_seed(0)
    rolls = [C.Rollout(0, torch.randint(3, 300, (int(p),), generator=g).tolist(),
                       torch.randint(3, 300, (int(n),), generator=g).tolist(), "", [0.0] * int(n), "length")
             for p, n in [(5, 7), (3, 2), (6, 9)]]
    batch = C.collate(rolls, 0)
    grads, out = norm_gain_grads(tiny_lm, batch, temperature=0.7, hidden_layer=1)
    assert out["check"] < 1e-5  # the head recomputed from the norm's input gives forward_logprobs' log-probs
    assert out["hidden"].shape[:2] == batch["input_ids"].shape and out["entropy"].shape == out["logp"].shape
    w = tiny_lm.get_decoder().norm.weight
    for i, r in enumerate(rolls):
        one = C.collate([r], 0)
        tiny_lm.zero_grad()
        (C.forward_logprobs(tiny_lm, one, 0.7)["logp"] * one["response_mask"]).sum().backward()
        torch.testing.assert_close(grads[i], w.grad, atol=1e-5, rtol=1e-4)
    tiny_lm.zero_grad()



def test_refresh_dvpo_reads_the_prompts_alone_and_keeps_every_other_number(tmp_path, monkeypatch):
    """--refresh-dvpo: V(s_0) of the prompts with a one-token response is V(s_0) of the same prompts with the
    rollouts the full run collates (the value before the first token cannot see the response), and only the
    DVPO column of the files changes."""
    import argparse
    import json
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import dvpo
    import ppo
    tok = AutoTokenizer.from_pretrained(C.resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id))
    gvm = ppo.ValueModel(lm).eval()
    torch.nn.init.normal_(gvm.head.weight)  # the zero-initialised head would give 0 for every prompt
    questions = ["What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?", "7 * 6 = ?"]
    responses = [[11, 12, 13], [14], [15, 16, 17, 18, 19]]
    rolls = [C.Rollout(i, C._prompt_ids(tok, C.build_prompt(tok, C.Problem("", q, ""))), ids, "", [0.0] * len(ids),
                       "length") for i, (q, ids) in enumerate(zip(questions, responses))]
    full = baseline_data.critic_at_start(gvm, C.collate(rolls, tok.pad_token_id), 2)
    alone = baseline_data.critic_at_start(gvm, baseline_data.prompt_batch(tok, questions), 2)
    np.testing.assert_allclose(alone, full, atol=1e-6)
    assert np.ptp(alone) > 0

    out = str(tmp_path / "baselines")
    kept = {"p_oracle": np.array([0.5, 0.25, 1.0]), "grads": np.ones((3, 2, 4), np.float32), "dvpo": np.zeros(3)}
    np.savez_compressed(out + ".npz", **kept)
    (tmp_path / "baselines.json").write_text(json.dumps({"settings": {"model": "smollm2-135m", "dvpo_gvm": "old"},
                                                         "questions": questions}))
    monkeypatch.setattr(dvpo, "load_gvm", lambda folder, *_: (gvm, {}))
    baseline_data.refresh_dvpo(argparse.Namespace(out=out, dvpo_gvm="new", micro=2))
    with np.load(out + ".npz") as f:
        got = dict(f)
    assert set(got) == set(kept) and np.array_equal(got["grads"], kept["grads"])
    np.testing.assert_allclose(got["dvpo"], full, atol=1e-6)
    assert json.loads((tmp_path / "baselines.json").read_text())["settings"]["dvpo_gvm"] == "new"
    with pytest.raises(SystemExit, match="nope.json not found"):
        baseline_data.refresh_dvpo(argparse.Namespace(out=str(tmp_path / "nope"), dvpo_gvm="new", micro=2))

sys.path.insert(0, str(ROOT / "notebooks"))
import estimators as E  # noqa: E402


def test_mse_against_oracle_removes_the_oracles_noise():
    """Statistical (seed 0): a baseline equal to the true p scores ~0 although p_hat is noisy, and a baseline off by
    0.1 everywhere scores ~0.01; tolerance 4 standard errors of the estimate."""
    rng = np.random.default_rng(0)
    p = rng.random(4000)
    K = 8
    p_hat = rng.binomial(K, p) / K
    for offset in (0.0, 0.1):
        m, se = E.mse_against_oracle(p + offset, p_hat, K)
        assert abs(m - offset ** 2) < 4 * se, (offset, m, se)
    naive = np.mean((p - p_hat) ** 2)
    assert naive > 0.015  # what the correction removes: E p(1-p)/K ~ 0.021


def test_estimators_by_hand():
    r = np.array([[1.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(E.group_mean(r), [[0.75] * 4])
    np.testing.assert_allclose(E.leave_one_out(r), [[2 / 3, 1.0, 2 / 3, 2 / 3]])
    np.testing.assert_allclose(E.sibling_probe(np.array([[0.2, 0.6]])), [[0.6, 0.2]])
    adv, g = np.array([[1.0, -1.0]]), np.array([[[2.0, 0.0], [0.0, 4.0]]])
    np.testing.assert_allclose(E.pg_estimate(adv, g), [1.0, -2.0])  # (1*[2,0] - 1*[0,4]) / 2


def test_v05_replay_matches_the_fusion():
    """k_max = 4: V0.5's fusion of the first 4 rewards, exactly v05.fuse; adaptive: draws the pool in order."""
    import v05
    rng = np.random.default_rng(1)
    r = (rng.random((50, 16)) < rng.random(50)[:, None]).astype(float)
    prior = rng.random(50)
    mu4, k4 = E.v05_fused(r, prior, k_max=4)
    np.testing.assert_allclose(mu4, v05.fuse(r[:, :4].sum(1), np.full(50, 4), prior)[0])
    assert (k4 == 4).all()
    mu, k = E.v05_fused(r, prior)
    assert (k >= 4).all() and (k <= 16).all() and (k > 4).any()
    hits = np.array([r[i, :k[i]].sum() for i in range(50)])
    np.testing.assert_allclose(mu, v05.fuse(hits, k, prior)[0])


def printed(cell) -> str:
    """What a code cell printed (stdout only: warnings and kernel chatter go to stderr)."""
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline_mse", "gradient_variance"])
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    """Each notebook executes top to bottom on the committed data, writes its figures, and raises nothing."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    monkeypatch.setenv("NOTEBOOK_FIGURES", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    committed = [printed(c) for c in nb.cells if c.cell_type == "code"]
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    # seeded and read from committed data: the tables it prints are the ones committed beside the text
    assert [printed(c) for c in nb.cells if c.cell_type == "code"] == committed
    pngs = sorted(tmp_path.glob("*.png"))
    shipped = sorted(p.name for p in (ROOT / "notebooks").glob("*.png"))
    made = {"baseline_mse": ["baseline_mse_real.png", "baseline_mse_sim.png"],
            "gradient_variance": ["accuracy_curves.png", "gradient_variance.png"]}[name]
    assert [p.name for p in pngs] == made and set(made) <= set(shipped)
    assert all(p.stat().st_size > 20_000 for p in pngs)
