"""Problem loaders: the six shared/data/math schemas, malformed rows, and the arith generator."""
import json
import re

import pytest

import common as C
from conftest import SHARED

MATH = SHARED / "data" / "math"
FILES = {  # file: (rows, first gold answer)
    "math500.jsonl": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "aime24.jsonl": (30, "204"),
    "amc23.jsonl": (40, "27"),
    "minerva_math.jsonl": (272, None),
    "olympiadbench.jsonl": (675, "2"),
    "gsm8k.jsonl": (1319, "18"),
}


@pytest.mark.skipif(not MATH.exists(), reason="needs ../shared/data/math")
@pytest.mark.parametrize("name", list(FILES))
def test_loader_on_shared_files(name):
    probs = C.load_problems(str(MATH / name))
    n, first = FILES[name]
    assert len(probs) == n
    assert all(p.question and p.answer for p in probs)
    assert len({p.id for p in probs}) == n
    if first is not None:
        assert probs[0].answer == first
    if name == "minerva_math.jsonl":  # gold = last \boxed{} of the solution, nested braces intact
        assert probs[0].answer.count("{") == probs[0].answer.count("}")
        assert "\\boxed" not in probs[0].answer
    if name == "olympiadbench.jsonl":
        assert not any(p.answer.startswith("$") for p in probs)


@pytest.mark.skipif(not MATH.exists(), reason="needs ../shared/data/math")
def test_shared_gold_answers_verify_against_themselves():
    """Every gold answer must parse: a boxed copy of it has to score 1 (else the set is unusable)."""
    probs = [p for f in FILES for p in C.load_problems(str(MATH / f), limit=20)]
    rewards, _ = C.score([f"\\boxed{{{p.answer}}}" for p in probs], [p.answer for p in probs])
    assert sum(rewards) / len(rewards) > 0.95


def test_a_relative_path_also_reads_from_the_project_folder(tmp_path, monkeypatch):
    """The paper preset's --eval-data data/eval/math500.jsonl, given from another working folder (a notebook, a
    benchmark run elsewhere), is found in the repository's data/; the run's git commit is found from there too."""
    monkeypatch.chdir(tmp_path)
    assert len(C.load_problems("data/eval/math500.jsonl", limit=2)) == 2
    assert C.git_commit() is None or len(C.git_commit().rstrip("+")) == 40


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n" + '{"question": "2+2?", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        C.load_problems(str(f))
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no gold answer"):
        C.load_problems(str(f))
    f.write_text(json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no 'problem'"):
        C.load_problems(str(f))
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        C.load_problems(str(f))
    with pytest.raises(SystemExit, match="does not exist"):
        C.load_problems(str(tmp_path / "missing.jsonl"))


def test_arith_is_deterministic_and_spans_levels():
    a, b = C.load_problems("arith"), C.load_problems("arith")
    assert [(p.question, p.answer) for p in a] == [(p.question, p.answer) for p in b]
    test = C.load_problems("arith:test")
    assert [p.question for p in test[:50]] != [p.question for p in a[:50]]
    assert {p.level for p in a} == set(range(1, 11))
    # answers are right: redo the arithmetic the question states, from its numbers in the order they appear
    ops = {4: lambda x: x[0] - x[1], 5: lambda x: x[0] * x[1], 9: lambda x: x[0] * x[1],
           10: lambda x: x[0] * x[1] - x[2]}
    for p in a[:300] + test[:300]:
        nums = [int(t) for t in re.findall(r"\d+", p.question)]
        assert int(p.answer) == ops.get(p.level, sum)(nums), (p.level, p.question, p.answer)


def test_problem_stream_resumes_exactly():
    probs = C.load_problems("arith")[:10]
    s1 = C.ProblemStream(probs, seed=3)
    seq = [p.id for p in s1.take(25)]
    s2 = C.ProblemStream(probs, seed=3)
    s2.take(7)
    s3 = C.ProblemStream(probs, seed=3)
    s3.cursor = s2.cursor
    assert [p.id for p in s3.take(18)] == seq[7:]
    assert sorted(seq[:10]) == sorted(p.id for p in probs)  # each epoch is a permutation


def test_split_by_key_holds_out_a_share_of_keys_with_all_their_items():
    rows = [{"prompt": f"q{i % 8}", "i": i} for i in range(40)]
    kept, held = C.split_by_key(rows, lambda r: r["prompt"], 0.25, seed=0)
    assert sorted(r["i"] for r in kept + held) == list(range(40))
    assert len({r["prompt"] for r in held}) == 2 and len(held) == 10  # 2 of 8 prompts, 5 rows each
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in kept}
    assert C.split_by_key(rows, lambda r: r["prompt"], 0.25, seed=0) == (kept, held)  # the seed fixes the draw
    assert {r["prompt"] for r in C.split_by_key(rows, lambda r: r["prompt"], 0.25, seed=1)[1]} != {
        r["prompt"] for r in held}
    assert C.split_by_key(rows, lambda r: r["prompt"], 0.0, seed=0) == (rows, [])


def test_build_prompt_uses_chat_template():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(C.resolve_model("smollm2-135m"))
    text = C.build_prompt(tok, C.Problem("x", "What is 2 + 3?", "5"))
    assert text.endswith("<|im_start|>assistant\n")
    assert "What is 2 + 3?" in text and "\\boxed{}" in text
