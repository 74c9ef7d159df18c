"""Triton's version policy: which of a model's numbered version folders are served."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """``latest`` serves the ``n`` highest versions, ``all`` every one, ``specific`` a list."""

    kind: str
    n: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def latest(cls, n: int = 1) -> VersionPolicy:
        return cls("latest", n=n)

    @classmethod
    def all(cls) -> VersionPolicy:
        return cls("all")

    @classmethod
    def specific(cls, versions: tuple[int, ...]) -> VersionPolicy:
        return cls("specific", versions=tuple(sorted(set(versions))))

    def select(self, available: Iterable[int]) -> tuple[int, ...]:
        """The versions to serve out of those present, ascending."""
        present = sorted(set(available))
        if self.kind == "all":
            return tuple(present)
        if self.kind == "specific":
            return tuple(v for v in present if v in self.versions)
        return tuple(present[-self.n :]) if present else ()
