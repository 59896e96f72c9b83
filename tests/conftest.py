"""Shared fixtures. Nothing here downloads: the tiny models are built from configs with random weights,
and the end-to-end tests use the embedded smollm2-135m that installs with requirements.txt."""
import os
import shutil
import sys
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
