"""Reward specs: per domain, the reward dimensions, their scorers, weights and options.

    math:                                   # a domain
      correct: 1.0                          # weight only: scorer = the domain's name ("math")
      length: {scorer: length, weight: 0.1, args: {soft_limit: 512, hard_limit: 1024}}
      language: 0.1                         # alias of language_consistency

R = sum_d w_d * r_d over the dimensions (DESIGN.md "The math"). Abstention: the scalar is None (the
sample is excluded from its group's advantage, and counted) only when the *primary* dimension abstains
(the first one listed, or `primary:`); an auxiliary dimension that abstains contributes 0 and is logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from rewards.base import get_scorer

# Dimension names that stand for a scorer of another name.
ALIASES = {"language": "language_consistency"}


class SpecError(ValueError):
    """A reward spec is malformed; the message names the key path (rewards.<domain>.<dimension>...)."""


@dataclass(frozen=True)
class Dimension:
    name: str  # the logged name of this reward dimension
    scorer: str  # registered scorer
    weight: float
    args: Mapping = field(default_factory=dict)  # scorer options (bound as keyword arguments)


@dataclass(frozen=True)
class RewardSpec:
    domain: str
    dimensions: tuple[Dimension, ...]
    primary: str

    def combine(self, vector: Mapping[str, float | None]) -> float | None:
        """The scalar reward of one reward vector (None iff the primary dimension abstained)."""
        if vector.get(self.primary) is None:
            return None
        return sum(d.weight * vector[d.name] for d in self.dimensions if vector.get(d.name) is not None)


def parse_spec(domain: str, raw: Mapping, where: str = "rewards") -> RewardSpec:
    """Build and validate one domain's spec from its config mapping."""
    path = f"{where}.{domain}"
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(f"{path}: expected a non-empty mapping of dimension -> weight or {{scorer, weight, args}}")
    raw = dict(raw)
    primary = raw.pop("primary", None)
    dims = []
    for name, val in raw.items():
        key = f"{path}.{name}"
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            scorer, weight, args = ALIASES.get(name, domain if name == "correct" else name), float(val), {}
        elif isinstance(val, Mapping):
            unknown = set(val) - {"scorer", "weight", "args"}
            if unknown:
                raise SpecError(f"{key}: unknown keys {sorted(unknown)} (allowed: scorer, weight, args)")
            scorer = val.get("scorer", ALIASES.get(name, domain if name == "correct" else name))
            weight, args = val.get("weight", 1.0), dict(val.get("args") or {})
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise SpecError(f"{key}.weight: expected a number, got {weight!r}")
        else:
            raise SpecError(f"{key}: expected a weight or a mapping, got {val!r}")
        try:
            get_scorer(scorer)
        except ValueError as exc:
            raise SpecError(f"{key}: {exc}") from None
        dims.append(Dimension(str(name), scorer, float(weight), args))
    primary = primary or dims[0].name
    if primary not in {d.name for d in dims}:
        raise SpecError(f"{path}.primary: '{primary}' is not one of its dimensions {[d.name for d in dims]}")
    return RewardSpec(domain, tuple(dims), primary)


def parse_specs(raw: Mapping, where: str = "rewards") -> dict[str, RewardSpec]:
    """All domains' specs from the `rewards:` config section."""
    return {str(domain): parse_spec(str(domain), val, where) for domain, val in raw.items()}


def single_scorer_spec(scorer: str, args: Mapping | None = None) -> RewardSpec:
    """A one-dimension spec, for scoring with a bare scorer name."""
    return parse_spec(scorer, {scorer: {"scorer": scorer, "weight": 1.0, "args": dict(args or {})}})
