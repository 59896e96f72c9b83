"""Shared fixtures. Nothing here downloads: the tiny models are built from configs with random weights,
and the end-to-end tests use the embedded smollm2-135m that installs with requirements.txt."""
import io
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


@pytest.fixture
def tiny_lm():
    """A 2-layer Llama with a 300-token vocabulary and random weights, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).float().eval()


class TinyTok:
    """Just enough tokenizer for the sampler: ids pass through as space-separated integers."""
    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 1)))


@pytest.fixture
def tiny_tok():
    return TinyTok()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """mktemp for a run that a module's tests share, removed when the module is done (pytest.ini removes a
    passed test's own tmp_path; a module's folders would otherwise live until the session ends)."""
    made = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]
    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def rolled_back(run: Path, step: int, dest: Path) -> Path:
    """A copy of a finished run folder as a crash right after its step-`step` checkpoint leaves it (bar the later
    metrics rows and checkpoints, which --resume must drop or replace). The run kept that checkpoint as OUT/ckpt-<step>
    (--save-every, --keep-checkpoints). Weights and states are hard links, since a run writes new files and never
    into old ones; everything else is copied, since a resumed run appends to its logs."""
    def place(src, dst):
        if src.endswith((".safetensors", ".pt")):
            return os.link(src, dst)
        return shutil.copy2(src, dst)
    shutil.copytree(run, dest, copy_function=place)
    for old in [dest / "ckpt", *dest.glob("ckpt-*")]:
        if old.name != f"ckpt-{step}":
            shutil.rmtree(old)
    (dest / f"ckpt-{step}").rename(dest / "ckpt")
    return dest


def project_names() -> dict:
    """Every name bound in the project's imported modules (common, plumbing, the methods, benchmarks), by module."""
    def ours(m) -> bool:
        path = Path(getattr(m, "__file__", None) or "/").resolve()
        return (path.is_file() and ROOT in path.parents
                and path.relative_to(ROOT).parts[0] not in ("tests", ".venv"))
    return {k: dict(vars(m)) for k, m in list(sys.modules.items()) if k != "__main__" and ours(m)}


def restore_names(before: dict):
    """Undo what a script run in this process rebound in a project module (a benchmark that replaces
    C.save_checkpoint for its run would otherwise leave it replaced for every later test)."""
    for k, names in before.items():
        module = vars(sys.modules[k])
        for name, value in names.items():
            if module.get(name) is not value:
                module[name] = value


def run_script(script: str, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` from the repository root, as a user runs it (the file executes as __main__, its flags go
    through sys.argv), but in this process: no interpreter start-up and no second import of torch and transformers,
    which cost about 5 s a run on 2 cores. -> returncode, stdout and stderr, as subprocess.run gives them.
    env: the variables set in a process of its own instead, for settings a library reads at import (HF_HUB_OFFLINE).
    check: AssertionError with the output's tail when the script fails."""
    path = ROOT / script
    if env is not None:
        p = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, **env})
    else:
        out, err, code = io.StringIO(), io.StringIO(), 0
        argv_before, cwd_before, names_before = sys.argv, os.getcwd(), project_names()
        sys.argv = [str(path), *argv]
        os.chdir(ROOT)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                runpy.run_path(str(path), run_name="__main__")
        except SystemExit as stop:  # what the interpreter does with it: a message goes to stderr, exit status 1
            if isinstance(stop.code, str):
                err.write(stop.code + "\n")
            code = 1 if isinstance(stop.code, str) else (stop.code or 0)
        except Exception:  # an uncaught error: its traceback on stderr, exit status 1
            err.write(traceback.format_exc())
            code = 1
        finally:
            sys.argv = argv_before
            os.chdir(cwd_before)
            restore_names(names_before)
        p = subprocess.CompletedProcess([str(path), *argv], code, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-2000:] + p.stderr[-3000:])
    return p
