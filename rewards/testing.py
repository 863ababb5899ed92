"""Pytest helpers for your own scorers:

    from rewards.testing import assert_scores
    def test_my_scorer():
        assert_scores("my_scorer", ["\\boxed{4}", "five"], [1.0, 0.0], answer=["4", "4"])
"""
from __future__ import annotations

import functools
import math

from rewards.base import call_scorer, get_scorer


def score(scorer, completions: list[str], options: dict | None = None, **row_fields) -> list[float | None]:
    """Run a scorer (a registered name or a function) through the contract checks. `options` are the
    scorer's settings (a spec's `args`); `row_fields` are lists aligned with `completions`."""
    name = scorer if isinstance(scorer, str) else getattr(scorer, "__name__", "scorer")
    fn = get_scorer(scorer) if isinstance(scorer, str) else scorer
    return call_scorer(name, functools.partial(fn, **options) if options else fn, completions, **row_fields)


def assert_scores(
    scorer, completions: list[str], expected: list[float | None], tol: float = 1e-9, options: dict | None = None, **row_fields
):
    """Assert a scorer's output equals `expected` (None = abstain), within `tol`, with a readable diff."""
    got = score(scorer, completions, options, **row_fields)
    bad = [
        (i, c[:60], e, g)
        for i, (c, e, g) in enumerate(zip(completions, expected, got))
        if (e is None) != (g is None) or (e is not None and not math.isclose(e, g, abs_tol=tol))
    ]
    assert len(got) == len(expected) and not bad, "scores differ (index, completion, expected, got): " + repr(bad)
    return got
