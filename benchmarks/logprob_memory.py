"""Peak memory of one forward + backward of the per-token log-prob loss: common.forward_logprobs (lm head and
log-softmax in chunks under checkpointing: the [B, T, V] logits never exist) against the naive version
(full logits, log_softmax over them, gather), on the same batch of the default model (vocabulary 49,152).

    python benchmarks/logprob_memory.py                  # 8 rows x (32 prompt + 1024 response) tokens, chunk 256
    python benchmarks/logprob_memory.py --response 256 --no-grad-checkpointing --chunk 1024

By default both variants recompute decoder activations in backward (--grad-checkpointing, verl's default):
otherwise the decoder's own activations, the same in both, dominate and hide what the loss saves.

Each variant runs in its own process. On CPU the figure is the rise of the process's resident memory
high-water mark over its resident size just before the step (Linux: VmHWM reset through /proc/self/clear_refs);
on a GPU, max_memory_allocated over memory_allocated before the step. Both count what the step adds on top
of the weights and the batch. The last line is `logprob_memory chunked_gb=<a> naive_gb=<b> ratio=<a/b>`.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402


def naive_logprobs(model, batch, temperature=1.0):
    """What forward_logprobs replaces: logits for every position of every row, then log_softmax: [B, L]."""
    P, L = batch["prompt_len"], batch["response_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits.float()  # [B, P+L, V]
    logp = torch.log_softmax(logits[:, P - 1:P + L - 1] / temperature, -1)  # [B, L, V]
    return logp.gather(-1, batch["response_ids"][..., None])[..., 0]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one(variant: str, a) -> dict:
    """Run in a child process: load, build the batch, measure one step of `variant`."""
    dev, dtype = C.pick_device(a.device)
    model, tok, _ = C.load_model(a.model, dev, dtype)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    roll = [C.Rollout(0, torch.randint(V, (a.prompt,), generator=g).tolist(),
                      torch.randint(V, (a.response,), generator=g).tolist(), "", [0.0] * a.response, "length")
            for _ in range(a.rows)]
    batch = C.collate(roll, tok.pad_token_id, dev)
    mask = batch["response_mask"]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = rss_kib("VmRSS") * 1024
    logp = C.forward_logprobs(model, batch, chunk=a.chunk)["logp"] if variant == "chunked" else naive_logprobs(model, batch)
    (-(logp * mask).sum() / mask.sum()).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_kib("VmHWM") * 1024
    return {"variant": variant, "step_gb": (peak - before) / 2**30, "vocab": V, "tokens": a.rows * (a.prompt + a.response)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256, help="forward_logprobs' tokens per lm-head chunk (--logp-chunk)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="both variants recompute decoder layer activations in backward")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a)))
        return
    res = {}
    for variant in ("chunked", "naive"):
        # glibc serves big blocks from mmap and unmaps them on free, so resident memory follows live tensors
        # (its default adapts the threshold upwards and keeps freed blocks resident, hiding the difference)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant], capture_output=True, text=True,
                           env=env)
        if p.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{p.stderr[-2000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} forward+backward adds {res[variant]['step_gb']:.3f} GB "
              f"({a.rows} rows x {a.prompt}+{a.response} tokens, vocabulary {res[variant]['vocab']})", flush=True)
    c, n = res["chunked"]["step_gb"], res["naive"]["step_gb"]
    print(f"logprob_memory chunked_gb={c:.3f} naive_gb={n:.3f} ratio={c / n:.2f}")


if __name__ == "__main__":
    main()
