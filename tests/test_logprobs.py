"""Chunked log-probs equal the naive full-logits computation; the sampler's log-probs equal the trainer's."""
import pytest
import torch

import common as C
import ppo


def make_batch(seed=0, B=5, vocab=300):
    g = torch.Generator().manual_seed(seed)
    rolls = []
    for b in range(B):
        p = torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        y = torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        rolls.append(C.Rollout(b, p, y, "", [0.0] * len(y), "length"))
    return C.collate(rolls, pad_id=0)


def naive_logprobs(model, batch, temperature):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits.float() / temperature  # [B, T, V]: all of it
    P, L = batch["prompt_len"], batch["response_ids"].shape[1]
    logp_all = torch.log_softmax(logits[:, P - 1:P + L - 1], -1)
    logp = logp_all.gather(-1, batch["response_ids"][..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = batch["response_mask"]
    return logp * m, ent * m


def test_collate_layout():
    rolls = [C.Rollout(0, [5, 6, 7], [8, 1], "", [-0.1, -0.2], "stop"), C.Rollout(1, [9], [10, 11, 12], "", [-1, -2, -3], "length")]
    b = C.collate(rolls, pad_id=0)
    assert b["prompt_len"] == 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 1, 0], [0, 0, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b["position_ids"][1].tolist()[2:] == [0, 1, 2, 3]  # positions restart at the first real token
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["sampler_logp"][1].tolist() == [-1, -2, -3]


@pytest.mark.parametrize("chunk", [1, 7, 1024, 0])  # 0: one chunk, no recompute
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_naive_values_and_grads(tiny_lm, chunk, temperature):
    batch = make_batch()
    w = torch.randn(batch["response_ids"].shape, generator=torch.Generator().manual_seed(1))
    out = C.forward_logprobs(tiny_lm, batch, temperature, chunk=chunk, entropy=True)
    ((out["logp"] * w).sum() + out["entropy"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in tiny_lm.named_parameters()}
    tiny_lm.zero_grad()
    logp, ent = naive_logprobs(tiny_lm, batch, temperature)
    ((logp * w).sum() + ent.sum()).backward()
    assert torch.allclose(out["logp"], logp, atol=1e-5)
    assert torch.allclose(out["entropy"], ent, atol=1e-5)
    for n, p in tiny_lm.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def grouped_batch(groups=3, G=4, seed=0, vocab=300):
    """Rollouts in groups that share a prompt (prompts of different lengths, responses of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    rolls = []
    for k in range(groups):
        p = torch.randint(3, vocab, (3 + 2 * k,), generator=g).tolist()
        for _ in range(G):
            y = torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            rolls.append(C.Rollout(k, p, y, "", [0.0] * len(y), "length"))
    return C.collate(rolls, pad_id=0)


@pytest.mark.parametrize("G", [4, 1])
def test_shared_prompts_give_the_same_logprobs_and_grads(tiny_lm, G):
    """Each distinct prompt through the decoder once, its KV cache indexed out to the group's rows, equals one
    pass over [prompt | response] rows: log-probs, entropies and every parameter's gradient to 1e-5 (float32
    rounding only; G=1: no prompt repeats, the plain pass)."""
    batch = grouped_batch(G=G)
    w = torch.randn(batch["response_ids"].shape, generator=torch.Generator().manual_seed(1))
    res = []
    for share in (False, True):
        tiny_lm.zero_grad()
        out = C.forward_logprobs(tiny_lm, batch, 0.7, chunk=5, entropy=True, share_prompts=share)
        ((out["logp"] * w).sum() + out["entropy"].sum()).backward()
        res.append((out["logp"].detach(), out["entropy"].detach(), [p.grad.clone() for p in tiny_lm.parameters()]))
    m = batch["response_mask"].bool()
    assert torch.allclose(res[0][0][m], res[1][0][m], atol=1e-5) and torch.allclose(res[0][1][m], res[1][1][m], atol=1e-5)
    for a, b in zip(res[0][2], res[1][2]):
        assert torch.allclose(a, b, atol=1e-5)


def test_shared_prompts_backward_sums_in_a_fixed_order(tiny_lm):
    """The shared pass hands a prompt's states to its G rows with index_select, whose backward (index_add_) sums
    the G rows' gradients in index order. Advanced indexing (x[inv], as DynamicCache.batch_select_indices does)
    backs up through index_put_(accumulate=True), which on CPU adds with atomics in a thread-dependent order:
    that was the ~1e-6 drift between a run and its --resume. No such node may be in the graph."""
    h = C.shared_prompt_states(tiny_lm.get_decoder(), grouped_batch(G=4), share=True)  # [B, L, d]
    seen, todo, names = set(), [h.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    assert not [n for n in names if n.startswith("IndexBackward")], "advanced indexing: non-deterministic backward on CPU"
    assert "IndexSelectBackward0" in names, "the shared path was not taken"


def test_hidden_layer_is_that_layers_output(tiny_lm):
    batch = make_batch()
    with torch.no_grad():
        out = C.forward_logprobs(tiny_lm, batch, hidden_layer=1)
        ref = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[1]
    assert out["hidden"].shape == (5, batch["input_ids"].shape[1], 32)
    assert torch.allclose(out["hidden"], ref, atol=1e-6)


def test_hf_sampler_logprobs_match_trainer(tiny_lm, tiny_tok):
    """The decode loop (left padding, KV cache, position ids) scores tokens exactly as the trainer does."""
    s = C.HFSampler(tiny_lm, tiny_tok, batch_size=4)
    prompts = ["5 6 7 8 9", "10 11", "12 13 14"]
    roll = s.generate(prompts, [2, 3, 1], max_new_tokens=10, temperature=0.8, seed=3)
    assert [r.prompt_idx for r in roll] == [0, 0, 1, 1, 1, 2]  # per-prompt n, in prompt order
    assert all(len(r.ids) == len(r.logprobs) <= 10 for r in roll)
    batch = C.collate(roll, pad_id=0)
    with torch.no_grad():
        trainer = C.forward_logprobs(tiny_lm, batch, temperature=0.8)["logp"]
    assert torch.allclose(trainer, batch["sampler_logp"], atol=1e-4)


def test_hf_sampler_is_seeded_and_respects_min_tokens(tiny_lm, tiny_tok):
    s = C.HFSampler(tiny_lm, tiny_tok)
    a = s.generate(["5 6 7"], 4, 8, 1.0, seed=11)
    b = s.generate(["5 6 7"], 4, 8, 1.0, seed=11)
    assert [r.ids for r in a] == [r.ids for r in b]
    tiny_lm.lm_head.bias = None
    with torch.no_grad():  # make eos the most likely token, then forbid it for 5 tokens
        tiny_lm.lm_head.weight[1] = tiny_lm.lm_head.weight[1] + 50 * tiny_lm.model.norm.weight
    r = s.generate(["5 6 7"], 3, 8, 1.0, seed=0, min_new_tokens=5)
    assert all(len(x.ids) >= 6 for x in r)  # 5 forced tokens, then eos
    assert all(x.finish == "stop" and x.ids[-1] == 1 for x in r)


def test_grad_checkpointing_gives_the_same_update_and_returns_to_eval(tiny_lm):
    """--grad-checkpointing changes memory, not numbers: the same step for the policy and for a ValueModel."""
    import copy
    rolls = [C.Rollout(0, [5, 6, 7][: 1 + i % 3], [10 + i, 11, 12, 13][: 2 + i % 3], "", [-1.0] * 4, "stop")
             for i in range(4)]
    batch = C.collate(rolls, pad_id=0)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.0])[:, None] * batch["response_mask"]
    returns = torch.rand(4, batch["response_mask"].shape[1]) * batch["response_mask"]
    out = []
    for ckpt in (False, True):
        args = C.TrainArgs(epochs=1, minibatch_size=0, micro_batch_size=2, seed=0, max_grad_norm=1e9, temperature=1.0,
                           logp_chunk=4, eps_low=0.2, eps_high=0.2, dual_clip=0.0, loss_agg="token-mean",
                           max_new_tokens=4, kl_coef=0.0, kl_type="k3", grad_checkpointing=ckpt, autocast="off")
        torch.manual_seed(0)  # the same random head in both runs
        policy, critic = copy.deepcopy(tiny_lm), ppo.ValueModel(copy.deepcopy(tiny_lm))
        torch.nn.init.normal_(critic.head.weight, std=0.5)
        C.policy_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, args)
        ppo.value_update(critic, torch.optim.SGD(critic.parameters(), lr=1.0), batch, returns,
                       returns * 0, args, clip=0.0)
        assert not policy.training and not critic.backbone.training  # eval again: the sampler keeps its KV cache
        assert policy.is_gradient_checkpointing == ckpt
        out.append((policy, critic))
    for a, b in zip(out[0], out[1]):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(pa, pb, atol=1e-6), name
    assert not torch.allclose(out[0][0].model.layers[0].mlp.up_proj.weight, tiny_lm.model.layers[0].mlp.up_proj.weight)


def test_bf16_autocast_is_mixed_precision_and_close_to_float32(tiny_lm):
    """--autocast bf16: the weights and their gradients stay float32, the update points where float32's does
    (cosine > 0.99 over all parameters) and log-probs stay within 0.05 of float32's (tolerance ours: bf16 keeps
    8 bits of mantissa; on smollm2-135m the mean gap measured 0.017)."""
    import copy
    batch = make_batch(3, B=6, vocab=tiny_lm.config.vocab_size)
    adv = torch.linspace(-1, 1, 6)[:, None] * batch["response_mask"]
    deltas, logps = [], []
    for mode in ("off", "bf16"):
        args = C.TrainArgs(epochs=1, minibatch_size=0, micro_batch_size=3, seed=0, max_grad_norm=1e9, temperature=1.0,
                           logp_chunk=4, eps_low=0.2, eps_high=0.2, dual_clip=0.0, loss_agg="token-mean",
                           max_new_tokens=12, kl_coef=0.0, kl_type="k3", grad_checkpointing=False, autocast=mode)
        policy = copy.deepcopy(tiny_lm)
        with torch.no_grad(), C.update_mode(policy, False, mode):
            logps.append(C.forward_logprobs(policy, batch)["logp"])
        C.policy_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, args)
        assert all(p.dtype == torch.float32 for p in policy.parameters())
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), tiny_lm.parameters())]))
    m = batch["response_mask"].bool()
    assert logps[1].dtype == torch.float32 and (logps[0] - logps[1])[m].abs().max() < 0.05
    assert 0 < (logps[0] - logps[1])[m].abs().max()  # autocast was on
    assert torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0) > 0.99
