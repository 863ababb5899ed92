"""Rule scorers: golden examples, agreement with math-verify on 100+ pairs, the scorer contract."""
from __future__ import annotations

import pytest
from math_verify import parse, verify

import rewards
from rewards import ScorerError, call_scorer, get_scorer
from rewards.rule import format_problems, last_boxed
from rewards.testing import assert_scores

# (gold, prediction text, human label). The predictions exercise boxed answers, fractions, decimals,
# LaTeX, roots, percentages, sets, intervals, negative numbers, units and plain wrong answers.
_PAIRS = []
for n in [0, 1, 2, 7, 12, 42, 100, 256, 1000, -3, -15]:
    _PAIRS += [(str(n), f"\\boxed{{{n}}}", 1), (str(n), f"The answer is \\boxed{{{n + 1}}}", 0),
               (str(n), f"so the result is ${n}$", 1)]
for p, q in [(1, 2), (1, 3), (2, 3), (3, 4), (5, 8), (7, 2)]:
    _PAIRS += [(f"\\frac{{{p}}}{{{q}}}", f"\\boxed{{{p}/{q}}}", 1),
               (f"{p}/{q}", f"\\boxed{{\\frac{{{p}}}{{{q}}}}}", 1),
               (f"\\frac{{{p}}}{{{q}}}", f"\\boxed{{\\frac{{{q}}}{{{p}}}}}", int(p == q))]
for d in ["0.5", "0.25", "0.75", "1.5", "2.5"]:
    _PAIRS += [(d, f"\\boxed{{{d}}}", 1), (d, f"\\boxed{{{float(d) + 1}}}", 0)]
_PAIRS += [("\\frac{1}{2}", "\\boxed{0.5}", 1), ("0.5", "\\boxed{\\frac{1}{2}}", 1), ("\\frac{3}{4}", "\\boxed{0.75}", 1)]
for k in [2, 3, 5, 7, 11]:
    _PAIRS += [(f"\\sqrt{{{k}}}", f"\\boxed{{\\sqrt{{{k}}}}}", 1), (f"\\sqrt{{{k}}}", f"\\boxed{{{k}}}", 0),
               (f"2\\sqrt{{{k}}}", f"\\boxed{{\\sqrt{{{4 * k}}}}}", 1)]
_PAIRS += [("\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}", 1), ("\\{1, 2\\}", "\\boxed{\\{1, 3\\}}", 0),
           ("(0, 1)", "\\boxed{(0, 1)}", 1), ("[0, 1]", "\\boxed{(0, 1)}", 0), ("(-\\infty, 2]", "\\boxed{(-\\infty, 2]}", 1),
           ("x^2 + 2x + 1", "\\boxed{(x+1)^2}", 1), ("x^2 - 1", "\\boxed{(x-1)(x+1)}", 1), ("x^2", "\\boxed{x^3}", 0),
           ("\\pi", "\\boxed{\\pi}", 1), ("2\\pi", "\\boxed{\\pi}", 0), ("e^{2}", "\\boxed{e^2}", 1),
           ("50\\%", "\\boxed{50\\%}", 1), ("5", "\\boxed{5 \\text{ cm}}", 1), ("10", "\\boxed{10\\text{ apples}}", 1),
           ("-\\frac{1}{2}", "\\boxed{-0.5}", 1), ("3", "no answer here", 0), ("3", "", 0),
           ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1), ("1", "\\boxed{1.0}", 1), ("1", "\\boxed{0.999}", 0),
           ("12", "答案是 \\boxed{12}", 1), ("x = 3", "\\boxed{3}", 1), ("3", "\\boxed{x = 3}", 1)]


def test_at_least_100_pairs():
    assert len(_PAIRS) >= 100


def _direct(gold: str, pred: str) -> float:
    gold_text = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    return float(verify(parse(gold_text, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None))


def test_math_scorer_agrees_with_math_verify_and_labels():
    golds, preds, labels = zip(*_PAIRS)
    ours = get_scorer("math")([f"<think>\nwork\n</think>\n{p}" for p in preds], answer=list(golds))
    direct = [_direct(g, p) for g, p in zip(golds, preds)]
    assert ours == direct
    wrong = [(g, p, lab, o) for g, p, lab, o in zip(golds, preds, labels, ours) if o != lab]
    assert not wrong, f"math scorer disagrees with the human labels: {wrong}"


def test_math_scores_only_the_final_answer_and_gold_lists():
    s = get_scorer("math")
    # \boxed{5} in the reasoning does not count; the final answer does.
    assert s(["<think>maybe \\boxed{5}</think> \\boxed{6}"], answer=["5"]) == [0.0]
    assert s(["\\boxed{6}"], answer=[["5", "6"]]) == [1.0]


def test_unparsable_gold_abstains_and_is_counted():
    rewards.take_events()
    assert get_scorer("math")(["\\boxed{1}"], answer=[""]) == [None]
    assert rewards.take_events() == {"math:unparsable_gold": 1}


@pytest.mark.parametrize(
    "text,problems",
    [
        ("<think>ok</think> so \\boxed{3}", []),
        ("ok</think> \\boxed{3}", []),  # opening tag was in the prompt
        ("<think>ok so \\boxed{3}", ["unclosed thinking"]),
        ("<think>a</think><think>b</think>\\boxed{1}", ["repeated thinking tags"]),
        ("</think>\\boxed{1} or \\boxed{2}", ["not exactly one final \\boxed{} answer"]),
        ('<think>x</think><tool_call>{"name": "search", "arguments": {"q": "a"}}</tool_call>', []),
        ("<think>x</think><tool_call>{name: search}</tool_call>", ["tool call is not JSON"]),
        ('<tool_call>{"name": "search"}</tool_call>', ["tool call lacks name/arguments"]),
        ('<tool_call>{"name": "s", "arguments": {}}', ["unclosed tool call", "not exactly one final \\boxed{} answer"]),
    ],
)
def test_format_problems(text, problems):
    assert format_problems(text) == problems


def test_format_scorer_and_require_thinking():
    assert_scores("format", ["</think>\\boxed{1}", "\\boxed{1}"], [1.0, 1.0])
    assert get_scorer("format")(["\\boxed{1}"], require_thinking=True) == [0.0]


def test_exact_and_regex():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert_scores("exact", ["</think> \\boxed{Paris }", "paris", "Lyon"], [1.0, 1.0, 0.0], answer=["paris"] * 3)
    assert get_scorer("regex")(["</think> 2024-01-05", "Jan 5"], pattern=r"\d{4}-\d{2}-\d{2}") == [1.0, 0.0]


def test_contract_violations_name_the_scorer():
    with pytest.raises(ScorerError, match="scorer 'short' returned 1 scores for 2 completions"):
        call_scorer("short", lambda c, **_: [1.0], ["a", "b"])
    with pytest.raises(ScorerError, match=r"scorer 'str' returned '1' at index 1; expected a float or None"):
        call_scorer("str", lambda c, **_: [1.0, "1"], ["a", "b"])
    rewards.take_events()  # NaN/inf is caught: the sample abstains and the event is counted
    assert call_scorer("nan", lambda c, **_: [float("nan"), float("inf"), 0.5], ["a", "b", "c"]) == [None, None, 0.5]
    assert rewards.take_events() == {"nan:nonfinite": 2}
    with pytest.raises(ScorerError, match="row field 'answer' must be a list of 2, got 1"):
        call_scorer("math", get_scorer("math"), ["a", "b"], answer=["1"])
    with pytest.raises(ValueError, match=r"Unsupported scorer 'maths'. Supported: \['code', "):
        get_scorer("maths")


def test_rewards_imports_without_torch_ray_vllm():
    import subprocess
    import sys

    code = "import sys, rewards, rewards.pool, rewards.testing; print([m for m in ('torch', 'ray', 'vllm') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rewards_extra_covers_what_the_scorers_import():
    """The laptop install is `pip install --no-deps .` plus the `rewards` extra (README). Simulate that venv:
    a subprocess may import only the standard library, this project and the distributions the extra pulls
    in (resolved as pip would); importing `rewards` and running its scorers must still work there."""
    import json
    import subprocess
    import sys
    import tomllib
    from importlib import metadata
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parents[2]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["rewards"]
    todo, closure = [Requirement(r) for r in extra], set()
    while todo:  # the extra's requirements and theirs (markers evaluated, other extras left out)
        req = todo.pop()
        if canonicalize_name(req.name) in closure or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        closure.add(canonicalize_name(req.name))
        todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    allowed = sorted({m for m, dists in metadata.packages_distributions().items()
                      if any(canonicalize_name(d) in closure for d in dists)} | {"rewards", "tests"})
    code = """if True:
        import importlib.abc, json, sys
        allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names)

        class LaptopVenv(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] not in allowed and not name.startswith("_"):
                    raise ModuleNotFoundError(f"No module named {name!r} (not in the rewards extra)", name=name)

        sys.meta_path.insert(0, LaptopVenv())
        import rewards, rewards.pool, rewards.testing, rewards.__main__
        from rewards import get_scorer
        print(get_scorer("math")(["\\\\boxed{1}"], answer=["1"]),
              get_scorer("language_consistency")(["this is plainly an english sentence"], language=["en"]),
              get_scorer("rubric")(["x"], rubric=["r"], base_url="http://127.0.0.1:9/v1", model="m", max_retries=0),
              rewards.__main__.load_spec("examples/rewards/spec.yaml", None).domain,
              [m for m in ("torch", "ray", "vllm", "transformers") if m in sys.modules])
    """
    res = subprocess.run([sys.executable, "-c", code, json.dumps(allowed)], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[1.0] [1.0] [None] math []"
