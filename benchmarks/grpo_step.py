"""Seconds per GRPO step doing the same work as TRL's, to compare side by side with ../shared/bench/trl_grpo_step.py.

    python benchmarks/grpo_step.py --steps 4 --max-new-tokens 64 --group-size 4          # grpo.py's defaults
    python benchmarks/grpo_step.py --steps 4 --max-new-tokens 64 --group-size 4 --sampler vllm-bf16 \
        --share-prompts --logp-chunk 0 --autocast bf16 --micro-batch-size 32                 # every speed flag
    python ../shared/bench/trl_grpo_step.py --prompts 8 --group 4 --new-tokens 64 --steps 4  # the peer

Takes grpo.py's flags and runs grpo.main with three changes, so that every step does what TRL's does and
nothing else: every completion is exactly --max-new-tokens long (TRL's benchmark fixes the length too), every
row is trained (grpo.py skips rows whose advantages are all 0, TRL does not), and there is no evaluation,
oracle or checkpoint; --out is a temporary folder. The first step is warm-up. The last line printed is
'bench median_s_per_step=<x> gen=<y> train=<z> peak_mem_gb=<m>': medians over the later steps.
"""
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import grpo  # noqa: E402


def bench_line(metrics_path) -> str:
    """A run's metrics.jsonl -> 'bench median_s_per_step=... gen=... train=... peak_mem_gb=...' (step 1 is warm-up)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r for r in rows if r.get("time_step") is not None]
    steady = steps[1:] or steps

    def median(key):
        return float(np.median([r[key] or 0.0 for r in steady]))
    return (f"bench median_s_per_step={median('time_step'):.2f} gen={median('time_gen'):.2f} "
            f"train={median('time_train'):.2f} peak_mem_gb={max(r['peak_mem_gb'] for r in steps):.2f}")


def fixed_length(make_sampler):
    """Wrap common.make_sampler so every completion runs to max_new_tokens (no early end of sequence)."""
    def make(*args, **kwargs):
        sampler = make_sampler(*args, **kwargs)
        generate = sampler.generate

        def generate_fixed(prompts, n, max_new_tokens, *rest, **kw):
            return generate(prompts, n, max_new_tokens, *rest, **{**kw, "min_new_tokens": max_new_tokens})
        sampler.generate = generate_fixed
        return sampler
    return make


def main(argv=None) -> str:
    args = C.parse_args(grpo.Args, argv)
    args = dataclasses.replace(args, eval_problems=0, oracle_k=0, save_every=0, resume=False,
                               out=tempfile.mkdtemp(prefix="grpo_bench_"))
    C.make_sampler = fixed_length(C.make_sampler)
    C.rows_without_signal = lambda adv, ref_logp=None: None  # train every row, as TRL does
    C.save_checkpoint = lambda *a, **k: None  # a checkpoint is not part of a step
    path = grpo.main(args)
    print(f"bench: per-step metrics in {path}")
    line = bench_line(path)
    print(line)
    return line


if __name__ == "__main__":
    main()
