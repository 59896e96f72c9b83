"""Run folders: metrics.jsonl and the console line, trackers, the settings --resume checks, atomic checkpoints,
timers, and the two summary statistics methods and benchmarks report (roc_auc, pearson)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def flag(name: str) -> str:
    """A dataclass field's command-line name, without the dashes: foo_bar -> foo-bar."""
    return name.replace("_", "-")


METRICS = ["reward", "acc", "adv_std", "frac_reward_zero_std", "clipped_ratio", "rollouts", "tokens", "grad_norm", "entropy", "clip_frac",
           "kl", "baseline_mse", "time_gen", "time_train", "time_step", "peak_mem_gb", "eval_acc"]


def keep_steps(path: Path, last_step: int):
    """On resume: keep a per-step .jsonl file's lines up to the checkpoint's step, drop the rest. A last line cut
    short (a crash while it was written) is dropped; a bad line before it is an error naming it."""
    if path.exists():
        lines, keep = path.read_text().splitlines(), []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:
                if i < len(lines):
                    raise SystemExit(f"{path}:{i}: not valid JSON (only a last line cut by a crash is dropped)") from None
                print(f"{path}:{i}: dropped a line cut short by a crash")
                continue
            if row is not None and row["step"] <= last_step:
                keep.append(line)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(l + "\n" for l in keep))


class RunLogger:
    """One JSON line per training step in OUT/metrics.jsonl (every name in METRICS present, null when not
    measured that step, so notebooks can compare methods), and a compact console line."""
    CONSOLE = ["reward", "acc", "eval_acc", "rollouts", "frac_reward_zero_std", "entropy", "grad_norm", "time_step"]

    def __init__(self, out: str, resume_step: int = 0, report_to: str = "none"):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_steps(self.path, resume_step if resume_step > 0 else -1)  # a fresh run starts a fresh file
        self.tracker = tracker(report_to, Path(out))

    def log(self, step: int, metrics: dict):
        clean = lambda v: (None if math.isnan(v) else round(v, 6)) if isinstance(v, float) else v  # noqa: E731
        if step > 0:
            metrics = {**dict.fromkeys(METRICS, None), **metrics}
        row = {"step": step, **{k: clean(v) for k, v in metrics.items()}}  # NaN -> null: strict JSON
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker(step, {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
        shown = " ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                         for k in self.CONSOLE if row.get(k) is not None)
        tqdm.write(f"step {step:4d} {shown}")


def tracker(kind: str, out: Path):
    """--report-to: fn(step, {name: number}) for tensorboard or wandb (whichever the flag names; it must be installed),
    None for none."""
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report-to tensorboard: needs the package tensorboard (pip install tensorboard)") from None
        writer = SummaryWriter(str(out / "tensorboard"))

        def log(step, scalars):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return log
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report-to wandb: needs the package wandb (pip install wandb)") from None
        run = wandb.init(project="rlvr-baselines", name=out.name, dir=str(out), config=_settings_of(out))
        return lambda step, scalars: run.log(scalars, step=step)
    return None


# -------------------- Run folders: settings, resume, checkpoints ---------------------------------

# Flags that change how a run is computed, not what it computes: --resume may change them freely
OPERATIONAL = {"resume", "steps", "out", "save_every", "keep_checkpoints", "eval_every", "device", "sampler",
               "micro_batch_size", "logp_chunk", "grad_checkpointing", "share_prompts", "vllm_memory", "max_model_len",
               "vllm_sleep", "allow_changed", "overwrite", "report_to"}


def _settings_of(out: Path) -> dict:
    path = out / "config.json"
    return json.loads(path.read_text())["args"] if path.exists() else {}


def git_commit() -> str | None:
    """The project's git commit (with '+' when the tree has changes), or None outside a git checkout."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def start_run(args, method: str, steps: int | None = None, free: tuple = ()) -> dict:
    """Check --out, then write OUT/config.json: the method, every flag's value and the git commit.
    A fresh run refuses a folder that holds a run (metrics.jsonl or a checkpoint) unless --overwrite, which deletes
    them. --resume refuses a folder written by another method, and settings that change the run (all flags but
    OPERATIONAL and `free`, a stage's own length flags) that differ from the saved ones, naming each, unless
    --allow-changed; given the run's steps, it stops, saying so, when the checkpoint is already there.
    -> the settings written"""
    out = Path(args.out)
    path, ckpts = out / "config.json", [out / "ckpt", out / "ckpt.old", *out.glob("ckpt-*")]
    inside = lambda v: "OUT" + v[len(str(out)):] if isinstance(v, str) and v.startswith(str(out)) else v  # noqa: E731
    # a path inside OUT is kept relative to it, so a run folder that moved still resumes as itself
    settings = {"method": method, "commit": git_commit(),
                "args": {k: inside(v) for k, v in json.loads(json.dumps(dataclasses.asdict(args))).items()}}
    if args.resume:
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is None:
            print(f"--resume: {out} has no config.json (a run from before settings were saved): not checked")
        elif saved["method"] != method:
            raise SystemExit(f"--resume: {out} holds a {saved['method']} run, not {method}: choose another --out")
        else:
            changed = [f"--{flag(k)} {saved['args'].get(k)!r} (saved) -> {v!r} (now)" for k, v in settings["args"].items()
                       if k not in OPERATIONAL | set(free) and saved["args"].get(k, v) != v]
            if changed and not args.allow_changed:
                raise SystemExit(f"--resume: {path} holds other settings than these:\n  " + "\n  ".join(changed) +
                                 "\npass them as saved, or --allow-changed to resume with the new values")
            if changed:
                settings["changed_at_resume"] = changed
        meta = out / "ckpt" / "meta.json"
        step = json.loads(meta.read_text())["step"] if meta.exists() else None
        if steps is not None and step is not None and step >= steps:
            print(f"--resume: the checkpoint in {out} is at step {step} and --steps is {steps}: nothing to train "
                  "(raise --steps to continue)")
            raise SystemExit(0)
    elif (out / "metrics.jsonl").exists() or any(p.exists() for p in ckpts):
        if not args.overwrite:
            raise SystemExit(f"--out {out} holds a run (metrics.jsonl or ckpt/): --resume it, choose another --out, "
                             "or pass --overwrite to delete it")
        for p in ckpts:
            shutil.rmtree(p, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def finished_stage(args, method: str, marker, free: tuple = ()) -> bool:
    """--resume of a run in stages: True when the stage in args.out finished (`marker` is what its end writes).
    Its saved settings are checked as start_run checks them, so a stage that is skipped still names a changed flag."""
    if not (args.resume and Path(marker).exists()):
        return False
    start_run(args, method, free=free)
    return True


@contextlib.contextmanager
def atomic_file(path):
    """`with atomic_file(p) as tmp: write tmp`: the file appears at p whole when the block ends, never half-written
    (a crash leaves the old p or none); an error inside the block leaves p as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path, rows):
    """rows (dicts) -> path, one JSON object a line, written whole (atomic_file); the folder is made if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save_tokenizer(source: str, folder: Path):
    """Copy the tokenizer of the folder/hub id a model came from, so `--model OUT/ckpt/policy` loads alone."""
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    except (OSError, ValueError, TypeError):
        pass  # a model built from a config (tests): nothing to copy


def _plain(x):
    """Numpy arrays as tensors (tagged), so state.pt loads with torch.load(weights_only=True): no pickled code."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _unplain(x):
    if isinstance(x, dict):
        return x["__ndarray__"].numpy() if set(x) == {"__ndarray__"} else {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_unplain(v) for v in x)
    return x


def save_checkpoint(out: str, step: int, parts: dict, extra: dict | None = None, keep: int = 1):
    """OUT/ckpt/{<part>/model.safetensors..., state.pt, meta.json}; parts = {"policy": (model, optimizer), ...}.
    Written to a temporary folder, then swapped in with renames, so a crash at any moment leaves either
    the previous checkpoint or the new one, whole, never half of one (nor a policy and critic of two steps).
    keep > 1: the previous checkpoints stay as OUT/ckpt-<step>, the keep - 1 latest of them."""
    final, tmp, old = Path(out) / "ckpt", Path(out) / "ckpt.tmp", Path(out) / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (model, _) in parts.items():
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp / name)  # loadable by transformers / vLLM as it is, with its tokenizer:
            _save_tokenizer(getattr(model, "name_or_path", ""), tmp / name)
        else:
            from safetensors.torch import save_file
            (tmp / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / name / "model.safetensors")
    torch.save({"step": step, "optimizers": {n: o.state_dict() for n, (_, o) in parts.items() if o is not None},
                "extra": _plain(extra or {}),
                "rng": _plain({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})},
               tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if keep > 1 and old.exists():
        prev = json.loads((old / "meta.json").read_text())["step"] if (old / "meta.json").exists() else step - 1
        os.replace(old, Path(out) / f"ckpt-{prev}")
        kept = sorted(Path(out).glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
        for p in kept[:max(len(kept) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_state(path) -> dict:
    """A checkpoint's state.pt: step, optimizer states, extra, RNG; loaded without running pickled code."""
    return _unplain(torch.load(path, weights_only=True))


def load_checkpoint(out: str, parts: dict) -> dict:
    """Restore weights, optimizers and RNG in place from OUT/ckpt; return the state (step, extra)."""
    from safetensors.torch import load_file
    folder = Path(out) / "ckpt"
    if not (folder / "state.pt").exists() and (Path(out) / "ckpt.old" / "state.pt").exists():
        folder = Path(out) / "ckpt.old"  # crashed between the two renames: the old one is whole
    if not (folder / "state.pt").exists():
        raise SystemExit(f"--resume: no checkpoint in {Path(out) / 'ckpt'} (run with --save-every first)")
    state = read_state(folder / "state.pt")
    for name, (model, opt) in parts.items():
        sd = {k: v for f in sorted((folder / name).glob("*.safetensors")) for k, v in load_file(f).items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # a tied head is not saved
            raise SystemExit(f"--resume: {folder / name} does not match the model ({missing[:3]} {unexpected[:3]})")
        if opt is not None:
            opt.load_state_dict(state["optimizers"][name])
    random.setstate(tuple(state["rng"]["python"]))
    np.random.set_state(tuple(state["rng"]["numpy"]))
    torch.set_rng_state(state["rng"]["torch"])
    return state


class Timer:
    """Accumulates seconds per name: `with timer("time_gen"): ...`; the totals are in timer.t."""

    def __init__(self):
        self.t = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - start


# -------------------- Summary statistics (a logged metric or a benchmark's number) ------------------


def roc_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney U). NaN with one class."""
    s, lab = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[lab], s[~lab]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def pearson(a, b) -> float:
    """Pearson correlation of two [N] arrays; NaN (logged as null) when either has no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
