"""A name -> function registry shared by every package.

It lives in `rewards/` only because that is the bottom layer (rewards <- rollout <- rl <- launch): every
package may import it, and `rewards/` must not import the others.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions registered by name; unknown names fail with the supported list, duplicates fail too."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} '{name}' is already registered (by {self._fns[name].__module__})")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._fns:
            raise ValueError(f"Unsupported {self.kind} '{name}'. Supported: {self.names()}")
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
