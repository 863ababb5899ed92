"""The verifier scorer: per-row verifier programs in the sandbox."""
from __future__ import annotations

from rewards import get_scorer, take_events
from rewards.rule import final_answer
from rewards.verifier import run_verifier

EQ_42 = "def verify(answer):\n    return answer.strip() == '42'\n"


def test_verdicts_and_final_answer():
    take_events()
    texts = ["The answer is \\boxed{42}.", "41", "<think>maybe \\boxed{41}</think>\n\\boxed{42}", "42 "]
    assert get_scorer("verifier")(texts, verifier=[EQ_42] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert final_answer("<think>\\boxed{1}</think> so \\boxed{2}") == "2"


def test_a_verifier_that_raises_scores_zero_and_a_broken_one_abstains():
    take_events()
    raising = "def verify(answer):\n    return int(answer) > 0\n"
    out = get_scorer("verifier")(["\\boxed{5}", "\\boxed{five}", "x", "y"],
                                 verifier=[raising, raising, "def verify(a) return 1", "x = 1"])
    assert out == [1.0, 0.0, None, None]  # syntax error and missing verify(): the data's fault, not the model's
    assert take_events() == {"verifier:raised": 1, "verifier:broken": 2}


def test_non_bool_and_timeouts():
    assert run_verifier("def verify(a):\n    return 1\n", ["x"]) == ["not a bool: int"]
    # A hang inside verify(answer) is charged to that answer (0.0), not to the verifier (None): each answer
    # has its own process and deadline, so the others are still checked.
    hangs_on_x = "def verify(a):\n    while a == 'x': pass\n    return a == 'y'\n"
    assert run_verifier(hangs_on_x, ["x", "y"], timeout_s=1) == ["timed out", True]
    assert get_scorer("verifier")(["x", "y"], verifier=[hangs_on_x] * 2, timeout_s=1) == [0.0, 1.0]
    assert "NameError" in run_verifier("verify = lambda a: undefined_name", ["x"])[0]
    # Hanging while loading is the verifier's fault: it does not load, so the row abstains.
    assert run_verifier("while True: pass\ndef verify(a):\n    return True\n", ["x"], timeout_s=1).startswith("did not load")
