"""The `verifier` scorer: a per-row verifier program (synthesised agentic tasks, `rl.synthesize`).

A verifier is Python source that defines `verify(answer: str) -> bool`. It runs in the code sandbox, once
per distinct verifier for all the completions that share it (a group's n samples cost one process).
The answer passed in is the final answer: the last `\\boxed{}` after `</think>`, else that whole text.
"""
from __future__ import annotations

import json

from rewards.base import record_event, register_scorer
from rewards.rule import final_answer
from rewards.sandbox import SandboxLimits, run_python

_HARNESS = '''
import json as _json, sys as _sys
if not callable(globals().get("verify")):
    raise SystemExit("the verifier defines no verify(answer) function")
_out = []
for _a in _json.loads(_sys.stdin.read()):
    try:
        _r = verify(_a)
        _out.append(_r if isinstance(_r, bool) else "not a bool: " + type(_r).__name__)
    except Exception as _e:
        _out.append(type(_e).__name__ + ": " + str(_e)[:200])
print("\\n__VERDICTS__" + _json.dumps(_out))
'''


def run_verifier(source: str, answers: list[str], timeout_s: float = 5.0) -> list[bool | str] | str:
    """Per answer: True/False, or the error text when verify raised or returned a non-bool; or one error
    text for the whole verifier when it does not run (syntax error, no `verify`, time-out)."""
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))
    res = run_python(source + "\n" + _HARNESS, limits, stdin=json.dumps(answers))
    if res.limit_hit:
        return "timed out"
    if not res.ok or "__VERDICTS__" not in res.stdout:
        tail = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        return tail[:300]
    return json.loads(res.stdout.rsplit("__VERDICTS__", 1)[1])


@register_scorer("verifier")
def verifier_scorer(completions: list[str], verifier: list, timeout_s: float = 5.0, **_) -> list[float | None]:
    """1.0 if the row's verifier accepts the final answer, 0.0 if it rejects it or raises on it; None
    (abstain, counted as `verifier:broken`) when the verifier itself does not run: a data error, not the
    completion's fault."""
    out: list[float | None] = [None] * len(completions)
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(verifier):
        by_source.setdefault(str(src), []).append(i)
    for src, idx in by_source.items():
        verdicts = run_verifier(src, [final_answer(completions[i]) for i in idx], timeout_s)
        if isinstance(verdicts, str):
            record_event("verifier", "broken", len(idx))
            continue
        for i, v in zip(idx, verdicts):
            if v is not True and v is not False:
                record_event("verifier", "raised")
            out[i] = 1.0 if v is True else 0.0
    return out
