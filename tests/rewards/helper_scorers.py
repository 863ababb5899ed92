"""Scorers for the pool tests, referenced by import path (`tests.rewards.helper_scorers:sleepy`) so that
forked children and Ray actors find them the way they find a user's scorer."""
from __future__ import annotations

import os
import threading
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


def trl_reward(prompts, completions, completion_ids, solution, **kwargs):
    """Written for TRL's GRPOTrainer: keyword arguments, the dataset's `solution` column."""
    return [float(c.strip() == s) + 0.01 * len(ids) + 0.001 * len(p)
            for p, c, ids, s in zip(prompts, completions, completion_ids, solution)]


def trl_len_reward(completions, **kwargs):
    """TRL's documentation example: closer to 20 characters is better."""
    return [-abs(20 - len(c)) for c in completions]


def strict_reward(texts, answer):
    """No **kwargs and a first parameter named otherwise: gets the completions and only `answer`."""
    return [float(t == a) for t, a in zip(texts, answer)]


_THREE = threading.Barrier(3, timeout=5)


def together(completions, **_):
    """Returns only once three calls are in it at the same time (in-process scoring, `isolate=False`): a
    sequential caller breaks the barrier after 5 s and gets the exception."""
    _THREE.wait()
    return [1.0] * len(completions)


def pid(completions, **_):
    """The scoring process's id for every completion; hangs on 'hang'."""
    if any("hang" in c for c in completions):
        time.sleep(3600)
    return [float(os.getpid())] * len(completions)


def exits(completions, **_):
    """The process dies (os._exit) on 'die': a segfaulting extension, the OOM killer."""
    if any("die" in c for c in completions):
        os._exit(3)
    return [1.0] * len(completions)
