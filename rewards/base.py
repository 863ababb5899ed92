"""The scorer contract, its registry, and the failure counter.

A scorer is TRL's reward function: called with keyword arguments `completions` (list[str]), `prompts`,
`completion_ids` and the row's columns, it returns `list[float | None]`. Every row field is a list aligned
with `completions` (the data row's `answer`, `tests`, `language`, ... and the pipeline's `prompt` (the
user text), `num_tokens`, `truncated`). So a function written for TRL's `GRPOTrainer(reward_funcs=...)`
runs unchanged, and so does ours, `fn(completions, **row_fields)`: `call_scorer` passes `completions`
positionally when the first parameter has another name, and only the row fields a function names when it
takes no `**kwargs`. Deviation from TRL: completions are always text (TRL passes message lists for
conversational datasets); `prompts` are the rows' prompts as in the data (a string or chat messages).

`None` means the scorer abstains for that completion: the sample is excluded from the advantage and the
abstention is counted, never turned into 0. Scorer options (limits, weights of sub-checks, the judge's
endpoint) are bound with `functools.partial` from the reward spec's `args`.
"""
from __future__ import annotations

import contextvars
import importlib
import inspect
import math
import numbers
import os
import re
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable

from rewards.registry import Registry

Scorer = Callable[..., list]
SCORERS: Registry = Registry("scorer")


def register_scorer(name: str, warm: Callable[[], None] | None = None) -> Callable[[Scorer], Scorer]:
    """`warm()`: optional one-time set-up (imports, models) that `rewards.pool` runs in the parent before it
    forks scorer children, so that they inherit it instead of redoing it at every call."""
    def deco(fn: Scorer) -> Scorer:
        fn.warm = warm
        return SCORERS.register(name)(fn)

    return deco


_WARMED: set[str] = set()
_WARM_LOCK = threading.Lock()


def warm_scorer(name: str) -> None:
    """Run scorer `name`'s `warm()` once per process (a no-op for scorers without one)."""
    with _WARM_LOCK:
        if name in _WARMED:
            return
        _WARMED.add(name)
        warm = getattr(get_scorer(name), "warm", None)
        try:
            if warm is not None:
                warm()
        except Exception:  # noqa: BLE001  only a speed-up: the scorer's own call reports what is wrong
            pass


def get_scorer(name: str) -> Scorer:
    """The registered scorer `name`, or `package.module:function` for a user's scorer that must also be
    found by worker processes and Ray actors (they import the module). Unknown names fail with the
    supported list."""
    if ":" in name and name not in SCORERS:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"scorer '{name}': cannot import {attr} from {module} ({exc})") from None
    return SCORERS.get(name)


class ScorerError(ValueError):
    """A scorer broke the contract (wrong length, wrong type); the message names the scorer."""


# Counted events by "scorer:reason": failures that are not the completion's fault (timeouts, judge parse
# failures, crashed scorers) and flags (truncated completions). The driver logs and resets it every step;
# thread-safe because pools call from threads.
EVENTS: Counter = Counter()
_EVENTS_LOCK = threading.Lock()


def _fresh_lock_after_fork() -> None:
    # A forked scorer child must not inherit the lock held by a sibling thread of its parent.
    global _EVENTS_LOCK
    _EVENTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


# Where events go: the counter of the innermost `collect_events()` of this context (the scoring pool copies
# the caller's context into its threads), else the process-wide EVENTS.
_SINK: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("reward_events", default=None)


@contextmanager
def collect_events():
    """Count the events of this block apart from everything else running at the same time: the driver's
    evaluation thread and the training step's scoring never see each other's events. Yields the counter."""
    sink: Counter = Counter()
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def _counter() -> Counter:
    sink = _SINK.get()
    return EVENTS if sink is None else sink


def record_event(scorer: str, reason: str, n: int = 1) -> None:
    with _EVENTS_LOCK:
        _counter()[f"{scorer}:{reason}"] += n


def merge_events(events: dict[str, int]) -> None:
    with _EVENTS_LOCK:
        _counter().update(events)


def take_events() -> dict[str, int]:
    """The counted events so far, and reset the counter (the driver calls this once per step)."""
    with _EVENTS_LOCK:
        out = dict(EVENTS)
        EVENTS.clear()
    return out


def check_scores(name: str, scores, n: int) -> list[float | None]:
    """Validate a scorer's output: a list of n numbers or None. NaN/inf become None (the sample abstains)
    and are counted as `<name>:nonfinite`; anything else malformed is a ScorerError."""
    if not isinstance(scores, (list, tuple)):
        raise ScorerError(f"scorer '{name}' returned {type(scores).__name__}, expected a list of {n} floats or None")
    if len(scores) != n:
        raise ScorerError(f"scorer '{name}' returned {len(scores)} scores for {n} completions")
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        if isinstance(s, bool) or not isinstance(s, numbers.Real):  # numbers.Real: numpy floats too
            raise ScorerError(f"scorer '{name}' returned {s!r} at index {i}; expected a float or None")
        if not math.isfinite(s):
            record_event(name, "nonfinite")
            out.append(None)
            continue
        out.append(float(s))
    return out


def call_scorer(name: str, fn: Scorer, completions: list[str], **row_fields) -> list[float | None]:
    """Call a scorer and validate its output; row fields must be lists aligned with completions."""
    for key, col in row_fields.items():
        if not isinstance(col, (list, tuple)) or len(col) != len(completions):
            got = len(col) if isinstance(col, (list, tuple)) else type(col).__name__
            raise ScorerError(f"scorer '{name}': row field '{key}' must be a list of {len(completions)}, got {got}")
    args, kwargs = bind_arguments(fn, completions, row_fields)
    return check_scores(name, fn(*args, **kwargs), len(completions))


def bind_arguments(fn: Scorer, completions: list[str], row_fields: dict) -> tuple[tuple, dict]:
    """TRL's keyword call (`prompts`, `completions`, `completion_ids`, the columns), fitted to `fn`'s
    signature (see the module docstring). `prompts` defaults to the `prompt` row field."""
    kwargs = dict(row_fields)
    if "prompt" in kwargs:
        kwargs.setdefault("prompts", kwargs["prompt"])
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: our positional contract
        return (completions,), kwargs
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params and params[k].kind is not params[k].POSITIONAL_ONLY}
    comp = params.get("completions")
    if comp is not None and comp.kind in (comp.POSITIONAL_OR_KEYWORD, comp.KEYWORD_ONLY):
        return (), {**kwargs, "completions": completions}
    return (completions,), kwargs


_THINK_END = "</think>"


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a completion. Reasoning is what precedes `</think>` (the opening tag may be
    in the prompt, as with Qwen3's generation prompt); None when the completion has no `</think>`."""
    if _THINK_END not in text:
        return None, text
    reasoning, answer = text.split(_THINK_END, 1)
    return re.sub(r"^\s*<think>", "", reasoning).strip(), answer.strip()


def column(row_fields: dict, key: str, n: int, default=None) -> list:
    """A row field as a list of n values (`default` repeated when the field is absent)."""
    col = row_fields.get(key)
    return list(col) if col is not None else [default] * n
