"""V0: a generalist value model that predicts a policy's success rate on a prompt before any rollout.

Paper
  V0: A Generalist Value Model for Any Policy at State Zero, arXiv 2602.03584 (official code: Now-Join-Us/V0)

What the method is
  A critic not tied to one policy: it reads the policy's history, rows (prompt x_i, success rate y_i), in context
  and predicts p(x) = P(success | x) for new prompts, with no update per policy (as TabPFN does for tables).
  Equation -> function:
      H(x) = frozen text encoder's token states [T, d]                        -> Backbone.encode, Backbone.pooled
      q(x) = q_0 + MLP(pool(H(x)))        K learned queries + a per-prompt offset (zero at init)
      z(x) = MHA(LN(q(x)), LN(W H), W H)  K queries of width e read the tokens -> [K*e]  -> DynamicQueryAdapter
      p(x) = head({(z(x_i), y_i)}_context, z(x))   in-context classifier (ours)  -> InContextHead, standardise
      L = 0.25 * mean_pairs -log sigma(s_i - s_j) + 0.75 * mean_i CE([1 - y_i, y_i], softmax(logits_i))
          (s = logit_1 - logit_0; a pair: y_i >= .5 > y_j among one context's queries) -> ranking_loss, soft_ce, v0_loss
  Before GRPO samples, p of candidate prompts decides where the rollouts go (ours: informative_prob,
  allocate_budget); v05.py builds on this file. Run: python v0.py --data FOLDER (prompt_dict.json, context.jsonl,
  train.jsonl).

Choices that are ours, not the authors' (why, and what the authors do: docs/v0.md, "Choices that are ours")
  - Backbone all-MiniLM-L6-v2 (a PyPI package), pooled as it was trained; --max-tokens 512.
  - Head: InContextHead trained from scratch with the adapter, not the authors' frozen, patched TabPFN v2.5.
  - Episodes: every epoch, each task's rows re-split into --queries queries and a context of random size.
  - Ranking pairs: every (success, failure) pair among an episode's queries, not class-balanced.
  - AdamW decays every trained parameter; a logit temperature is fitted on the --val prompts (fit_temperature).
  - The budget allocation rule, allocate_budget (the authors' code has none).
"""
from __future__ import annotations

import json
import math
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
PRETRAINED = "pretrained/v0-smollm2-arith"  # committed; made by the commands in docs/v0.md

# ------------------------------ Data: the authors' instruction-performance rows ------------------------------
# A row: {"id", "score", "type", "model", "step", "dataset"}; the prompt is prompt_dict[f"{dataset}_{id}"];
# score = mean of +-1 rewards, so the success rate is y = (score + 1) / 2. A task = (dataset, model, step).
ROW_KEYS = ("id", "score", "model", "step", "dataset")


def success_rate(score: float) -> float:
    return (score + 1.0) / 2.0


def prompt_key(row: dict) -> str:
    return f"{row['dataset']}_{row['id']}"


def read_rows(path, prompts: dict | None = None) -> list[dict]:
    """Rows of a .jsonl file, checked: every key present, score a number in [-1, 1], the prompt known."""
    for i, row in (lines := C.read_jsonl(path)):
        if missing := [k for k in ROW_KEYS if k not in row]:
            raise ValueError(f"{path}:{i}: row lacks {missing} (needs {list(ROW_KEYS)})")
        if not isinstance(row["score"], (int, float)) or not -1.0 <= row["score"] <= 1.0:
            raise ValueError(f"{path}:{i}: score must be a number in [-1, 1] (mean of +-1 rewards): {row['score']!r}")
        if prompts is not None and prompt_key(row) not in prompts:
            raise ValueError(f"{path}:{i}: prompt '{prompt_key(row)}' is not in the prompt file")
    return [row for _, row in lines]


def read_prompts(path) -> dict:
    prompts = C.read_json(path)
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: expected {{'<dataset>_<id>': prompt text}}")
    return prompts


def load_folder(folder) -> tuple[dict, list[dict]]:
    """The authors' layout: prompt_dict.json, context.jsonl and (optional) train.jsonl -> (prompts, rows)."""
    folder = Path(folder)
    prompts = read_prompts(folder / "prompt_dict.json")
    rows = read_rows(folder / "context.jsonl", prompts)
    return prompts, rows + (read_rows(folder / "train.jsonl", prompts) if (folder / "train.jsonl").exists() else [])


def by_task(rows: list[dict], items=None) -> dict[tuple, list]:
    """(dataset, model, step) -> its rows, or the items standing at their positions (items[i] for rows[i])."""
    out = defaultdict(list)
    for r, x in zip(rows, rows if items is None else items):
        out[(r["dataset"], r["model"], r["step"])].append(x)
    return dict(out)


# ------------------------------ Backbone: a frozen text encoder (C.TextEncoder), its token states padded -----
Backbone = C.TextEncoder  # H(x): name 'minilm', an embedding model, or a causal LM's hidden layer; cached states


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """list of [T_i, d] -> H [N, T, d] (fp32, zero-padded on the right), mask [N, T] bool."""
    H = nn.utils.rnn.pad_sequence([h.float() for h in states], batch_first=True)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(h), dtype=torch.bool) for h in states], batch_first=True)
    return H, mask


# ------------------------------ The model: dynamic query adapter (the authors') + in-context head (ours) -----
class DynamicQueryAdapter(nn.Module):
    """K learned queries, shifted per prompt, read the prompt's token states -> a [K*e] feature.
        q(x) = q_0 + MLP(h_pool(x))                      [K, e]; MLP's last layer zero-init -> q(x) = q_0 at init
        z(x) = MHA(LN(q(x)), LN(W_kv H), W_kv H)         [K, e] -> flattened [K*e]"""

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
    """Ours: (z - context mean) / (biased std + 1e-4), clipped to [-clip, clip]; a feature the context holds constant
    (std <= 1e-6) is only centred, as in TabPFN. zc [Nc, f], zq [Nq, f] -> (xc [Nc, f], xq [Nq, f])"""
    mu, sd = zc.mean(0), zc.std(0, unbiased=False)
    sd = torch.where(sd <= 1e-6, torch.ones_like(sd), sd + 1e-4)
    return ((zc - mu) / sd).clamp(-clip, clip), ((zq - mu) / sd).clamp(-clip, clip)


class InContextHead(nn.Module):
    """Ours (TabPFN-shaped, trained from scratch): context rows (z_i, y_i) and query rows z -> logits [Q, 2]. Every
    token attends to context tokens only: invariant to the context's order, and queries do not see each other."""

    def __init__(self, f: int, h: int = 128, layers: int = 3, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.x_in = nn.Linear(f, h)
        self.y_in = nn.Linear(2, h)  # (y, 1): a label embedding plus a "this row is labelled" offset
        self.unknown = nn.Parameter(torch.zeros(h))  # the query's missing label
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(h), "ln_ctx": nn.LayerNorm(h),
            "attn": nn.MultiheadAttention(h, heads, dropout, batch_first=True), "ln2": nn.LayerNorm(h),
            "mlp": nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * h, h)),
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
    """Adapter + head. The backbone stays outside (frozen, cached), so the checkpoint is the trained part only."""

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
        z = pooled.new_empty(len(states), self.adapter.K * self.adapter.e)  # on the adapter's device
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            z[idx] = self.adapter(*pad_states([states[i] for i in idx]), pooled[idx])
        return z

    def forward(self, zc, yc, zq):
        return self.head(zc, yc, zq)  # logits [Nq, 2]

    def save(self, folder, extra: dict):
        """folder/v0.safetensors, then folder/config.json, each written whole; the folder's other files stay."""
        from safetensors.torch import save_file
        Path(folder).mkdir(parents=True, exist_ok=True)
        with C.atomic_file(Path(folder) / "v0.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        with C.atomic_file(Path(folder) / "config.json") as tmp:
            tmp.write_text(json.dumps({**self.cfg, **extra}, indent=1))


def v0_folder(folder, flag: str | None = None) -> Path:
    """A checkpoint path as given, else relative to this file (the committed model, from any working directory).
    With the flag that named it, the folder must hold a checkpoint."""
    path = Path(folder) if Path(folder).exists() or not (HERE / folder).exists() else HERE / folder
    if flag and not ((path / "config.json").exists() and (path / "v0.safetensors").exists()):
        raise SystemExit(f"{flag} {folder}: not a V0 checkpoint (needs config.json and v0.safetensors; make one with "
                         "`python v0.py`)")
    return path


def load_v0(folder, device="cpu") -> tuple[V0, Backbone]:
    from safetensors.torch import load_file
    folder = v0_folder(folder, "--ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    backbone = Backbone(cfg["backbone"], cfg["backbone_layer"], cfg["max_tokens"], device)
    model = V0(backbone.dim, cfg)
    model.load_state_dict(load_file(folder / "v0.safetensors"))
    return model.eval(), backbone


def context_logits(model: V0, backbone: Backbone, ctx_texts: list[str], ctx_y, query_texts: list[str]) -> torch.Tensor:
    """The head's logits [Nq, 2] for the query texts, given the context's (text, success rate) rows."""
    states = backbone.encode(list(ctx_texts) + list(query_texts))
    z = model.features(states, backbone.pooled(states))
    return model(z[:len(ctx_texts)], torch.as_tensor(np.asarray(ctx_y, dtype=np.float32)), z[len(ctx_texts):])


@torch.no_grad()
def predict(model: V0, backbone: Backbone, ctx_texts: list[str], ctx_y, query_texts: list[str]) -> np.ndarray:
    """p(x) for each query text, given the context's (text, success rate) rows. -> [Nq] in (0, 1)"""
    if not ctx_texts:
        raise ValueError("V0 needs at least one context row (the policy's history) to predict from")
    logits = context_logits(model, backbone, ctx_texts, ctx_y, query_texts)
    return (logits / model.cfg.get("temperature", 1.0)).softmax(-1)[:, 1].numpy()


# ------------------------------ Loss -------------------------------------------------------------------------
def ranking_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: mean -log sigma(s_i - s_j) over pairs y_i >= 0.5 > y_j. logits [Q, 2], y [Q] -> scalar"""
    s = logits[:, 1] - logits[:, 0]
    pos, neg = y >= 0.5, y < 0.5
    if not pos.any() or not neg.any():
        return s.sum() * 0.0  # no pair: a zero that keeps the graph
    return -F.logsigmoid(s[pos][:, None] - s[neg][None, :]).mean()  # pairs [P, N]


def soft_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i -[(1 - y_i) log p0_i + y_i log p1_i]"""
    return F.cross_entropy(logits, torch.stack([1 - y, y], -1))


def v0_loss(logits, y, w_rank: float = 0.25) -> torch.Tensor:
    return w_rank * ranking_loss(logits, y) + (1 - w_rank) * soft_ce(logits, y)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Ours (Guo et al., 2017): the tau minimising soft_ce(logits / tau, y) on held-out rows, on a fixed grid."""
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 121))
    return float(grid[torch.stack([soft_ce(logits / t, y) for t in grid]).argmin()])


# ------------------------------ Training ---------------------------------------------------------------------
@dataclass
class TrainV0Args:
    """Train V0 (adapter + in-context head) on instruction-performance rows in the authors' layout."""
    data: str = arg("../shared/data/v0", "folder with prompt_dict.json, context.jsonl and (optional) train.jsonl")
    out: str = arg("runs/v0", "checkpoint folder (config.json + v0.safetensors)")
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
    lr: float = arg(2e-4, "AdamW learning rate (linear warm-up over the first 1/20 of the episodes, then cosine to 0)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    w_rank: float = arg(0.25, "weight of the ranking loss (1 - w_rank on the soft cross-entropy)")
    val: float = arg(0.1, "share of the training prompt ids kept for validation: logged each epoch, then fits the "
                     "logit temperature (0: temperature 1)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    seed: int = arg(0, "seed")

    def __post_init__(self):
        C.check_ranges(self, w_rank=(0, 1), queries=(1, None), epochs=(1, None), min_context=(1, None),
                       max_context=(self.min_context, None))
        if not 0 <= self.val < 1:
            raise ValueError(f"--val must be in [0, 1), got {self.val}")
        if self.e % self.heads or self.head_dim % self.head_heads:
            raise ValueError(f"--e must be a multiple of --heads, --head-dim of --head-heads; got {self.e}, "
                             f"{self.heads}, {self.head_dim}, {self.head_heads}")


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


@torch.no_grad()
def validation_logits(model, backbone, prompts, ctx_rows, val_rows, max_context, seed):
    """Logits of every validation row, each task's context drawn from its training rows. -> ([Nv, 2], y [Nv])"""
    model.eval()
    ctx_by, logits, ys = by_task(ctx_rows), [], []
    rng = np.random.default_rng(seed)
    for key, q in by_task(val_rows).items():
        if not (ctx := ctx_by.get(key, [])):
            continue
        if len(ctx) > max_context:
            ctx = [ctx[i] for i in rng.choice(len(ctx), max_context, replace=False)]
        texts = [prompts[prompt_key(r)] for r in ctx + q]
        logits.append(context_logits(model, backbone, texts[:len(ctx)], [success_rate(r["score"]) for r in ctx],
                                     texts[len(ctx):]))
        ys.append(torch.tensor([success_rate(r["score"]) for r in q]))
    model.train()
    return torch.cat(logits), torch.cat(ys)


def train(args: TrainV0Args):
    """V0 trained on every row of --data (benchmarks/v0_eval.py train holds prompts out first, then calls fit)."""
    return fit(args, *load_folder(args.data))


def fit(args: TrainV0Args, prompts: dict, rows: list[dict]) -> Path:
    C.seed_everything(args.seed)
    out = Path(args.out)
    rows, val_rows = C.split_by_key(rows, prompt_key, args.val, args.seed + 1)  # --val 0: every row trains
    backbone = Backbone(args.backbone, args.backbone_layer, args.max_tokens)
    backbone.use_disk_cache(Path(args.data) / "prompt_dict.json")
    states = backbone.encode([prompts[prompt_key(r)] for r in rows])
    pooled = backbone.pooled(states)
    y = torch.tensor([success_rate(r["score"]) for r in rows], dtype=torch.float32)
    tasks = {k: np.array(v) for k, v in by_task(rows, range(len(rows))).items()}  # task -> indices of its rows
    cfg = {k: getattr(args, k) for k in ("backbone", "backbone_layer", "max_tokens", "K", "e", "heads", "bottleneck",
                                         "dropout", "head_dim", "head_layers", "head_heads", "head_dropout")}
    model = V0(backbone.dim, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    n_ep = sum(math.ceil(len(idx) / args.queries) for idx in tasks.values())  # episodes per epoch
    total, warm = args.epochs * n_ep, max(1, int(0.05 * args.epochs * n_ep))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    print(f"V0: {len(rows)} rows, {len(tasks)} tasks, {sum(p.numel() for p in model.parameters()):,} "
          f"trained parameters, {total} episodes")
    log = []
    for epoch in C.tqdm(range(args.epochs), desc="v0 train"):
        model.train()
        losses = []
        for key, ci, qi in episodes(tasks, args, rng):
            idx = np.concatenate([ci, qi])
            z = model.features([states[i] for i in idx], pooled[idx])
            loss = v0_loss(model(z[:len(ci)], y[ci], z[len(ci):]), y[qi], args.w_rank)
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
            logits, yv = validation_logits(model, backbone, prompts, rows, val_rows, args.max_context, args.seed)
            row.update(val_loss=v0_loss(logits, yv, args.w_rank).item(),
                       val_mse=float(((logits.softmax(-1)[:, 1] - yv) ** 2).mean()))
        log.append(row)
        C.tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    # the ranking keeps improving while the probabilities grow overconfident: rescale the logits
    model.cfg["temperature"] = fit_temperature(logits, yv) if val_rows else 1.0
    model.save(out, {"trained_on": str(args.data), "rows": len(rows), "epochs": args.epochs, "seed": args.seed})
    C.write_jsonl(out / "train_log.jsonl", log)
    print(f"saved {out} (logit temperature {model.cfg['temperature']:.3f}, fitted on {len(val_rows)} validation rows)")
    return out


# ------------------------------ Using V0: where a step's rollouts go, and the history it reads ---------------
def informative_prob(p, n):
    """P(a group of n rollouts has reward spread) = 1 - p^n - (1 - p)^n  (0 for n < 2)."""
    p, n = np.asarray(p, float), np.asarray(n)
    return np.where(n >= 2, 1 - p ** n - (1 - p) ** n, 0.0)


def allocate_budget(p, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Ours: n_i = 0 or in [n_min, n_max] rollouts for candidates with predicted p [M], sum(n) <= budget, for the most
    expected informative groups sum_i u(p_i, n_i), u = informative_prob. Greedy on gain per rollout (open a group:
    u(p, n_min) / n_min; grow one: u(p, n+1) - u(p, n); a tie opens): exact when n_min == n_max, not always otherwise
    (docs/v0.md); rollouts that can neither grow a group nor open one stay unspent. -> n [M] ints"""
    p = np.clip(np.asarray(p, float), 0.0, 1.0)
    n, left = np.zeros(len(p), dtype=int), budget
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


def initial_history(v0_ckpt, spec: str = "auto", n: int = 64, policy: str | None = None,
                    step: int | None = None) -> list[tuple[str, float]]:
    """The last n rows a policy's history starts from: spec 'auto' (the V0 checkpoint's context.jsonl, if any), a rows
    .jsonl (prompt_dict.json beside it) or 'none'; policy (e.g. 'smollm2-135m@T0.7') and step (e.g. 16) filter the
    rows. -> [(prompt text, success rate)], oldest first"""
    path = v0_folder(v0_ckpt) / "context.jsonl" if spec == "auto" else Path(spec)
    if spec == "none" or (spec == "auto" and not path.exists()):
        return []
    if not path.exists():
        raise SystemExit(f"--history-init {spec}: no such rows file (or 'auto', or 'none')")
    prompts = read_prompts(path.parent / "prompt_dict.json")
    rows = [r for r in read_rows(path, prompts)
            if (policy is None or r.get("model") == policy) and (step is None or r.get("step") == step)]
    return [(prompts[prompt_key(r)], success_rate(r["score"])) for r in rows][-n:]


if __name__ == "__main__":
    C.run_command({"train": train}, train, TrainV0Args)  # `python v0.py [train] [flags]`
