"""Reward scorers. Imports without torch, Ray or vLLM, so scorers can be unit-tested on a laptop.

    from rewards import get_scorer
    get_scorer("math")(["... \\boxed{1/2}"], answer=["0.5"])   # -> [1.0]
"""
from rewards import code, language, rubric, rule, verifier  # noqa: F401  (register the built-in scorers)
from rewards.base import (
    EVENTS,
    SCORERS,
    ScorerError,
    call_scorer,
    collect_events,
    get_scorer,
    register_scorer,
    split_thinking,
    take_events,
)
from rewards.spec import Dimension, RewardSpec, SpecError, parse_spec, parse_specs, single_scorer_spec

__all__ = [
    "EVENTS", "SCORERS", "ScorerError", "call_scorer", "collect_events", "get_scorer", "register_scorer", "split_thinking",
    "take_events", "Dimension", "RewardSpec", "SpecError", "parse_spec", "parse_specs", "single_scorer_spec",
]
