"""math-verify rewards on tricky answers, fail-closed behaviour, and a call from a worker thread."""
import threading

import pytest

import common as C

CASES = [  # (completion, gold, reward)
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),                       # fraction vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),                                            # decimal vs bare LaTeX gold
    ("\\boxed{\\frac{3}{4}}", "$\\frac{3}{4}$", 1.0),                                 # gold wrapped in $...$
    ("We get \\boxed{\\sqrt{\\frac{1}{4}}}", "\\frac12", 1.0),                         # nested braces in the box
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),                                            # wrong fraction
    ("First \\boxed{3}, then corrected: \\boxed{7}", "7", 0.0),                        # several different boxes:
    ("First \\boxed{7}, then corrected: \\boxed{3}", "7", 0.0),                        # read as the set {3, 7},
    ("Both ways: \\boxed{7} and again \\boxed{7}", "7", 1.0),                          # so hedging earns nothing
    ("The total is 12 apples.", "12", 1.0),                                           # no box: last number
    ("I don't know.", "12", 0.0),                                                     # nothing extractable
    ("", "12", 0.0),                                                                  # empty completion
    ("\\boxed{1,000}", "1000", 1.0),                                                  # thousands separator
    ("\\boxed{27}", "27", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),                                        # symbolic equality
    ("\\boxed{\\{", "5", 0.0),                                                        # malformed LaTeX
]


@pytest.mark.parametrize("text,gold,want", CASES)
def test_score_tricky_answers(text, gold, want):
    rewards, _ = C.score([text], [gold])
    assert rewards == [want]


def test_no_answer_is_counted_and_fails_closed():
    rewards, no_answer = C.score(["I don't know.", "", "\\boxed{4}"], ["4", "4", "4"])
    assert rewards == [0.0, 0.0, 1.0]
    assert no_answer == 2


def test_score_from_a_worker_thread():
    """math-verify's alarm-based timeouts only work on the main thread; score() must not crash elsewhere."""
    out = {}

    def work():
        try:
            out["r"] = C.score([c[0] for c in CASES], [c[1] for c in CASES])[0]
        except BaseException as e:  # noqa: BLE001 - we want to see anything, TimeoutException included
            out["err"] = e
    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert "err" not in out, out.get("err")
    assert out["r"] == [c[2] for c in CASES]


def test_huge_completion_is_bounded():
    text = "1+" * 50_000 + "\\boxed{3}"
    assert C.score([text], ["3"])[0] == [1.0]


class FixedSampler:
    """Prompt i's k rollouts: the first hits[i] answer right, the rest wrong (no model)."""

    def __init__(self, hits):
        self.hits = hits

    def generate(self, prompts, n, max_new_tokens, temperature, seed=0):
        return [C.Rollout(i, [], [], "\\boxed{%d}" % (7 if j < self.hits[i] else 8), [], "stop")
                for i in range(len(prompts)) for j in range(n)]


def test_success_rates_and_the_oracle_baseline_mse(tiny_tok):
    problems = [C.Problem(str(i), "What is 3 + 4?", "7") for i in range(3)]
    sampler, args = FixedSampler([0, 1, 4]), type("A", (), {"oracle_k": 4, "max_new_tokens": 8, "temperature": 1.0})
    p_hat = C.success_rates(sampler, tiny_tok, problems, 4, 8, 1.0, seed=0)
    assert p_hat.tolist() == [0.0, 0.25, 1.0]
    st = C.oracle_baseline_mse(sampler, tiny_tok, problems, [0.5, 0.5, 0.5], args, seed=0)
    assert st["baseline_mse"] == pytest.approx((0.25 + 0.0625 + 0.25) / 3)
    assert st["oracle_var"] == pytest.approx((0 + 0.25 * 0.75 / 3 + 0) / 3)  # p(1 - p) / (K - 1), averaged
    assert C.evaluate(sampler, tiny_tok, problems, 8, n=4, temperature=1.0) == pytest.approx(1.25 / 3)
