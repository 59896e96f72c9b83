"""Problems: the built-in arith generator, .jsonl files in the schemas of ../shared/data, hub datasets, the
gold answers math-verify can read, and the seeded stream of training batches."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


PROJECT = Path(__file__).resolve().parents[1]  # the repository's folder, where data/ is

# -------------------- Problems -------------------------------------------------------------------


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # gold answer as text (LaTeX or plain), parsed by math-verify
    level: int = 0  # arith difficulty (0 for files)


# arith: word problems in ten levels, {level: (template, range of a, of b, of c, answer)}. On smollm2-135m
# (temperature 0.7, 48 tokens) levels 1, 2 and 5 succeed about half the time and levels 7-10 rarely, so
# a batch spans the whole range of success rates p(x), which is what value models need (docs/common.md: Problems).
ARITH_LEVELS = {
    1: ("What is {a} + {b}?", (1, 5), (1, 4), (0, 0), lambda a, b, c: a + b),
    2: ("What is {a} + {b}?", (1, 9), (1, 9), (0, 0), lambda a, b, c: a + b),
    3: ("{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", (2, 9), (1, 9), (0, 0),
        lambda a, b, c: a + b),
    4: ("{n} has {a} {t} and gives away {b}. How many {t} are left?", (5, 9), (1, 5), (0, 0), lambda a, b, c: a - b),
    5: ("What is {a} times {b}?", (2, 9), (2, 9), (0, 0), lambda a, b, c: a * b),
    6: ("What is {a} + {b}?", (10, 99), (1, 9), (0, 0), lambda a, b, c: a + b),
    7: ("{n} has {a} {t}, finds {b} more and then buys {c} more. How many {t} does {n} have?", (2, 9), (1, 9),
        (1, 9), lambda a, b, c: a + b + c),
    8: ("What is {a} + {b}?", (10, 99), (10, 99), (0, 0), lambda a, b, c: a + b),
    9: ("Each box holds {b} {t}. How many {t} are in {a} boxes?", (11, 30), (2, 9), (0, 0), lambda a, b, c: a * b),
    10: ("What is {a} times {b} minus {c}?", (10, 50), (2, 9), (1, 9), lambda a, b, c: a * b - c),
}
_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia"]
_THINGS = ["apples", "books", "coins", "shells", "pencils", "stickers", "marbles", "cards"]


def arith_problems(split: str = "train", n: int = 2000) -> list[Problem]:
    """A seeded, deterministic list of arithmetic word problems, levels drawn uniformly."""
    rng = random.Random({"train": 1, "test": 2}.get(split, sum(map(ord, split))))
    out = []
    for i in range(n):
        level = rng.randint(1, len(ARITH_LEVELS))
        template, *ranges, answer = ARITH_LEVELS[level]
        a, b, c = (rng.randint(*r) for r in ranges)
        q = template.format(a=a, b=b, c=c, n=rng.choice(_NAMES), t=rng.choice(_THINGS))
        out.append(Problem(f"arith-{split}-{i}", q, str(answer(a, b, c)), level))
    return out


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), matching nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def normalize_row(row: dict, where: str) -> Problem:
    """One row of any of the six schemas in shared/data/math, {question, answer}, or an RL training set's: the
    prompt as chat messages (the last user turn is the question) and the answer in reward_model.ground_truth
    (verl's parquet, DAPO-Math-17k) -> Problem."""
    q = row.get("problem") or row.get("question") or row.get("prompt")
    if isinstance(q, (list, tuple)):  # chat messages
        turns = [m.get("content") for m in q if isinstance(m, dict) and m.get("role") == "user"]
        q = turns[-1] if turns else None
    gold = row.get("reward_model")
    if isinstance(gold, dict) and gold.get("ground_truth") is not None:
        row = {**row, "answer": gold["ground_truth"]}
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: no 'problem', 'question' or 'prompt' text in row (keys: {sorted(row)})")
    if row.get("context"):  # olympiadbench: some problems share a preamble
        q = f"{row['context']}\n{q}"
    if row.get("final_answer") is not None:  # olympiadbench: list of "$...$"
        fa = row["final_answer"]
        parts = [s.strip().strip("$") for s in (fa if isinstance(fa, list) else [fa])]
        ans = ", ".join(p.replace("$,$", ", ") for p in parts)  # one item may hold two: "$a$,$b$"
    elif isinstance(row.get("answer"), (int, float)):  # amc23: 27.0
        x = row["answer"]
        ans = str(int(x)) if float(x).is_integer() else str(x)
    elif isinstance(row.get("answer"), str) and "####" in row["answer"]:  # gsm8k
        ans = row["answer"].split("####")[-1].strip().replace(",", "")
    elif isinstance(row.get("answer"), str):
        ans = row["answer"]
    elif isinstance(row.get("solution"), str) and _last_boxed(row["solution"]) is not None:  # minerva
        ans = _last_boxed(row["solution"]).replace("$ $", " ")  # a box that spans two $...$ runs
    else:
        raise ValueError(f"{where}: no gold answer ('answer', 'final_answer', or a \\boxed{{}} in 'solution')")
    rid = next((str(row[k]) for k in ("id", "idx", "unique_id") if row.get(k) is not None), where)
    return Problem(rid, q.strip(), str(ans).strip())


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line fails naming file and line."""
    path, out = Path(path), []
    if not path.exists():
        raise SystemExit(f"{path}: file does not exist")
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            out.append((i, row))
    return out


def read_json(path):
    """The JSON value in a file; a missing file or bad JSON fails naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: file does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_problems(spec: str, limit: int | None = None) -> list[Problem]:
    """'arith' / 'arith:test', a .jsonl path (a relative one also from the project's folder, where data/ is), or a
    hub dataset id 'org/name[:config][:split]'. limit 0: none (nothing is read)."""
    if limit == 0:
        return []
    if not Path(spec).exists() and (PROJECT / spec).exists():
        spec = str(PROJECT / spec)
    if spec.split(":")[0] == "arith":
        problems = arith_problems(spec.split(":")[1] if ":" in spec else "train")
    elif spec.endswith(".parquet"):  # verl's training files
        problems = [normalize_row(row, f"{spec}[{i}]") for i, row in enumerate(_datasets(spec).load_dataset(
            "parquet", data_files=spec, split="train"))]
    elif spec.endswith(".jsonl") or Path(spec).exists():
        path = Path(spec)
        problems = [normalize_row(row, f"{path}:{i}") for i, row in read_jsonl(path)]
        if not problems:
            raise ValueError(f"{path}: no problems in file")
    else:
        problems = hub_problems(spec)
    problems = problems if limit is None else problems[:limit]
    return problems if spec.split(":")[0] == "arith" else with_gold(problems, spec)


def with_gold(problems: list[Problem], spec: str) -> list[Problem]:
    """The problems whose gold answer math-verify can read; the others (empty or unparsable: every completion
    would score 0) are left out and counted, naming the first few; none readable is an error."""
    bad = [p for p in problems if not p.answer.strip() or not parse_gold(p.answer, True)]
    if bad:
        names = ", ".join(f"{p.id} ({p.answer[:20]!r})" for p in bad[:3])
        if len(bad) == len(problems):
            raise SystemExit(f"--data {spec}: no gold answer can be read ({names}, ...): check the answer field")
        print(f"--data {spec}: {len(bad)} of {len(problems)} problems left out, their gold answer empty or unreadable "
              f"({names}{', ...' if len(bad) > 3 else ''})")
    return [p for p in problems if p not in bad] if bad else problems


SPLITS = ("train", "test", "validation")


def hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'org/name[:config][:split]' -> (name, config, split); one part after the name is a split when it is one of
    SPLITS, else a config. Split default: train."""
    name, *rest = spec.split(":")
    if len(rest) > 2 or name.count("/") != 1:
        raise SystemExit(f"--data {spec}: not 'arith', an existing file, nor a hub id 'org/name[:config][:split]'")
    if len(rest) == 1:
        return (name, None, rest[0]) if rest[0] in SPLITS else (name, rest[0], "train")
    return name, (rest[0] if rest else None), (rest[1] if len(rest) == 2 else "train")


def _datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"--data {spec}: needs the package datasets (pip install datasets)") from None
    return datasets


def hub_problems(spec: str) -> list[Problem]:
    """A hub dataset's rows as problems, each distinct (question, answer) once (DAPO-Math-17k repeats its rows)."""
    name, config, split = hub_spec(spec)
    try:
        ds = _datasets(spec).load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, missing config: the hub's own message, with the id
        raise SystemExit(f"--data {spec}: could not load {name!r} (config {config}, split {split}): "
                         f"{e.__class__.__name__}: {str(e)[:300]}") from None
    seen, problems = set(), []
    for i, row in enumerate(ds):
        p = normalize_row(dict(row), f"{spec}[{i}]")
        if (p.question, p.answer) not in seen:
            seen.add((p.question, p.answer))
            problems.append(p)
    if len(problems) < len(ds):
        print(f"--data {spec}: {len(ds)} rows, {len(problems)} distinct problems")
    return problems


class ProblemStream:
    """Endless shuffled pass over problems; its whole state is one cursor, so --resume is exact."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.seed, self.cursor = problems, seed, 0

    def take(self, k: int) -> list[Problem]:
        out, n = [], len(self.problems)
        for _ in range(k):
            epoch, pos = divmod(self.cursor, n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(self.problems[perm[pos]])
            self.cursor += 1
        return out


def shuffled_batch(step: int, n: int, size: int, seed: int) -> list[int]:
    """The rows (of n) of batch `step` (from 1) of passes over n rows in shuffled batches of `size`: each pass's
    order depends on the seed and the pass only, so a resumed run draws the same batches."""
    epoch, i = divmod(step - 1, -(-n // size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 31 + epoch))
    return order[i * size:(i + 1) * size].tolist()


def split_by_key(items: list, key, share: float, seed: int) -> tuple[list, list]:
    """(kept, held): a share of the distinct keys, drawn at random, held out with every item that has one, so a key
    (a prompt) is never on both sides of the split."""
    keys = sorted({key(x) for x in items})
    held = set(np.random.default_rng(seed).choice(keys, round(share * len(keys)), replace=False).tolist())
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]



# -------------------- Gold answers: what math-verify reads (common.score parses completions the same way)

MAX_SCORED_CHARS = 4000  # off the main thread there is no alarm-based timeout: bound the work instead


def _mv_parse(text: str, on_main: bool):
    from math_verify import parse
    return parse(text[-MAX_SCORED_CHARS:], parsing_timeout=5 if on_main else None)


def parse_gold(answer: str, on_main: bool):
    """Gold answers come as plain numbers, bare LaTeX ('\\frac{1}{2}') or '$...$'; box them for the parser. An
    escaped dollar ('\\$18.90', MATH's currency) is not a math delimiter."""
    delimited = "\\boxed" in answer or "$" in answer.replace("\\$", "")
    gold = _mv_parse(answer if delimited else f"$\\boxed{{{answer}}}$", on_main)
    return gold or _mv_parse(answer, on_main)
