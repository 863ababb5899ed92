"""The `code` scorer: run the completion's program against the row's tests in the sandbox."""
from __future__ import annotations

import re

from rewards.base import register_scorer, split_thinking
from rewards.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The last fenced code block of the answer part, or the whole answer when there is none."""
    _, answer = split_thinking(text)
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer


@register_scorer("code")
def code_scorer(
    completions: list[str], tests: list, timeout_s: float = 5.0, memory_mb: int = 1024, **_
) -> list[float | None]:
    """1.0 if the program followed by the row's tests (asserts; a string or a list of strings) exits 0
    inside the sandbox within the limits, else 0.0. All-or-nothing, as in V3.2's code rewards."""
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)
    out: list[float | None] = []
    for text, t in zip(completions, tests):
        test_src = "\n".join(t) if isinstance(t, (list, tuple)) else str(t)
        out.append(1.0 if run_python(extract_code(text) + "\n\n" + test_src, limits).ok else 0.0)
    return out
