"""Rule-based scorers: math equivalence (math-verify), format, exact match, regex match.

Math uses `math-verify` for parsing and equivalence (boxed answers, fractions, LaTeX, sets, units).
Its own timeouts use `signal.alarm`, which fails outside the main thread, so they are switched off here:
our scoring pool enforces the time limit from outside (see `rewards.pool`).
"""
from __future__ import annotations

import json
import logging
import re

from rewards.base import column, record_event, register_scorer, split_thinking

# math-verify warns once per process that its own timeouts are off: they are, on purpose (docstring above).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _gold_text(gold: str) -> str:
    # Bare gold answers ("1/2", "\\frac{1}{2}") parse more reliably inside math delimiters.
    return gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"


def math_equal(gold: str, prediction: str) -> bool | None:
    """True/False from math-verify; None when the gold answer itself does not parse (a data error)."""
    from math_verify import parse, verify

    gold_parsed = parse(_gold_text(str(gold)), parsing_timeout=None)
    if not gold_parsed:
        return None
    pred_parsed = parse(prediction, parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _warm_math() -> None:
    math_equal("1/2", "\\boxed{\\frac{1}{2}}")  # imports math-verify, sympy and the LaTeX parser


@register_scorer("math", warm=_warm_math)
def math_scorer(completions: list[str], answer: list, **_) -> list[float | None]:
    """1.0 if the final answer (after `</think>`) is equivalent to a gold answer, else 0.0.

    `answer` holds one gold answer per completion, or a list of acceptable gold answers. A gold answer
    that math-verify cannot parse gives None (abstain) and is counted as `math:unparsable_gold`.
    """
    out: list[float | None] = []
    for text, gold in zip(completions, answer):
        _, final = split_thinking(text)
        golds = gold if isinstance(gold, (list, tuple)) else [gold]
        results = [math_equal(g, final) for g in golds]
        if all(r is None for r in results):
            record_event("math", "unparsable_gold")
            out.append(None)
        else:
            out.append(1.0 if any(results) else 0.0)
    return out


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_BOXED = re.compile(r"\\boxed\{")


def format_problems(text: str, require_thinking: bool = False) -> list[str]:
    """Why `text` is badly formatted (empty list = fine). Checked:
    - thinking tags: at most one `<think>` and one `</think>`, in that order, none left open;
    - tool calls: every `<tool_call>` is closed and holds a JSON object with a string `name` and an
      object `arguments`;
    - final answer: without tool calls, the text after `</think>` has exactly one `\\boxed{...}`.
    """
    problems = []
    n_open, n_close = text.count("<think>"), text.count("</think>")
    if n_open > 1 or n_close > 1:
        problems.append("repeated thinking tags")
    elif n_open == 1 and (n_close == 0 or text.index("<think>") > text.index("</think>")):
        problems.append("unclosed thinking")
    elif require_thinking and n_close == 0:
        problems.append("no thinking")
    reasoning, answer = split_thinking(text)
    if answer.count("<tool_call>") != answer.count("</tool_call>"):
        problems.append("unclosed tool call")
    calls = _TOOL_CALL.findall(answer)
    for body in calls:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            problems.append("tool call is not JSON")
            continue
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
            problems.append("tool call lacks name/arguments")
    if not calls and len(_BOXED.findall(answer)) != 1:
        problems.append("not exactly one final \\boxed{} answer")
    return problems


@register_scorer("format")
def format_scorer(completions: list[str], require_thinking: bool = False, **_) -> list[float | None]:
    """1.0 if `format_problems` finds nothing, else 0.0."""
    return [0.0 if format_problems(c, require_thinking) else 1.0 for c in completions]


def _normalise(s: str) -> str:
    return " ".join(str(s).split()).lower()


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str:
    """The final answer of a completion: the last `\\boxed{}` after `</think>`, else that whole text, stripped."""
    answer = split_thinking(text)[1]
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()


@register_scorer("exact")
def exact_scorer(completions: list[str], answer: list, **_) -> list[float | None]:
    """1.0 if the final answer (last `\\boxed{}` if any, else the text after `</think>`) equals the gold
    answer after whitespace/case normalisation."""
    out = []
    for text, gold in zip(completions, answer):
        golds = gold if isinstance(gold, (list, tuple)) else [gold]
        out.append(1.0 if _normalise(final_answer(text)) in {_normalise(g) for g in golds} else 0.0)
    return out


@register_scorer("regex")
def regex_scorer(completions: list[str], pattern: list | str | None = None, **fields) -> list[float | None]:
    """1.0 if the final answer fully matches `pattern` (an option, or a per-row field)."""
    pats = [pattern] * len(completions) if isinstance(pattern, str) else column({"p": pattern}, "p", len(completions))
    if any(p is None for p in pats):
        raise ValueError("regex scorer: give `pattern` as an option or a row field")
    return [1.0 if re.fullmatch(p, split_thinking(c)[1].strip(), re.S) else 0.0 for c, p in zip(completions, pats)]
