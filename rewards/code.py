"""The `code` scorer: the completion's program against the row's tests, judged by the sandbox's trusted harness.

The program is loaded as a module in its own sandboxed process; each test (an assert, or any Python that
raises when it fails) runs in the harness, which asks the program's process for the values it needs and
compares them itself (`rewards.sandbox.run_tests`). All-or-nothing, as in V3.2's code rewards: 1.0 when
every test passes, 0.0 otherwise, including an exit, a crash, a missing report or a time-out of the
program. A row whose tests do not compile, or that has none, abstains (None, counted): the data's fault.
"""
from __future__ import annotations

import re

from rewards.base import record_event, register_scorer, split_thinking
from rewards.sandbox import SandboxLimits, backend_from_options, run_tests

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The last fenced code block of the answer part, or the whole answer when there is none."""
    _, answer = split_thinking(text)
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer


@register_scorer("code")
def code_scorer(
    completions: list[str], tests: list, timeout_s: float = 5.0, memory_mb: int = 1024, sandbox: str = "local",
    sandbox_url: str | None = None, allow_weak_sandbox: bool = False, **_,
) -> list[float | None]:
    """1.0 if every test of the row (a string or a list of strings) passes against the program within the
    limits, else 0.0. `sandbox`: the backend (`local`: bubblewrap here; `http`: a SandboxFusion-compatible
    service at `sandbox_url`); `allow_weak_sandbox`: run locally without namespaces where they are
    unavailable instead of refusing (see `rewards.sandbox`)."""
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)
    backend = backend_from_options(sandbox, sandbox_url, allow_weak_sandbox)
    out: list[float | None] = []
    for text, t in zip(completions, tests):
        row = [str(x) for x in t] if isinstance(t, (list, tuple)) else [str(t)]
        try:
            report = run_tests(extract_code(text), row, limits, backend) if any(s.strip() for s in row) else None
        except SyntaxError:
            report = None
        if report is None:
            record_event("code", "bad_tests")
            out.append(None)
        else:
            out.append(1.0 if report.all_passed else 0.0)
    return out
