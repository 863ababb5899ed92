"""Scorers for the pool tests, referenced by import path (`tests.rewards.helper_scorers:sleepy`) so that
forked children and Ray actors find them the way they find a user's scorer."""
from __future__ import annotations

import time


def sleepy(completions, **_):
    """Hangs on completions containing 'hang' (a stuck reward service, a pathological sympy input)."""
    if any("hang" in c for c in completions):
        time.sleep(3600)
    return [float(len(c)) for c in completions]


def crashy(completions, **_):
    if any("boom" in c for c in completions):
        raise RuntimeError("scorer bug")
    return [1.0] * len(completions)
