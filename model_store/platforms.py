"""The platforms and backends a model config may name: which runtime kind each selects and
whether a version folder must hold the model file. Runtimes register their kind here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Platform:
    """One runtime kind: the config's ``platform`` and ``backend`` values that select it,
    and whether its versions are files here (False: served elsewhere, e.g. by Triton)."""

    kind: str
    platforms: frozenset[str] = field(default_factory=frozenset)
    backends: frozenset[str] = field(default_factory=frozenset)
    local_file: bool = True

    def matches(self, platform: str, backend: str) -> bool:
        return platform in self.platforms or backend in self.backends


class PlatformRegistry:
    """The known kinds. A config value names at most one kind: a second kind claiming it
    is refused (ValueError: a wiring mistake, found at start-up), so which runtime serves
    a model never depends on registration order."""

    def __init__(self, *known: Platform) -> None:
        self._kinds: dict[str, Platform] = {}
        for platform in known:
            self.register(platform)

    def register(self, platform: Platform) -> None:
        if self._kinds.get(platform.kind, platform) != platform:
            raise ValueError(f"runtime kind '{platform.kind}' is registered already")
        for other in self._kinds.values():
            if other.kind == platform.kind:
                continue
            taken = (other.platforms & platform.platforms) | (other.backends & platform.backends)
            if taken:
                raise ValueError(
                    f"runtime kind '{platform.kind}' claims {sorted(taken)}, which "
                    f"'{other.kind}' serves"
                )
        self._kinds[platform.kind] = platform

    def find(self, platform: str, backend: str) -> Platform | None:
        return next((p for p in self._kinds.values() if p.matches(platform, backend)), None)

    def copy(self) -> PlatformRegistry:
        return PlatformRegistry(*self._kinds.values())

    def __iter__(self) -> Iterator[Platform]:
        return iter(self._kinds.values())


ONNX = Platform("onnxruntime", frozenset({"onnxruntime_onnx"}), frozenset({"onnxruntime"}))
# Models served by remote Triton upstreams: no local model file.
TRITON = Platform("triton", frozenset({"triton"}), frozenset({"triton"}), local_file=False)
# What the store reads configs against: the built-in kinds.
PLATFORMS = PlatformRegistry(ONNX, TRITON)


def is_remote(platform: str, backend: str, known: PlatformRegistry = PLATFORMS) -> bool:
    """Whether a model with this platform/backend is served remotely (no file to load)."""
    found = known.find(platform, backend)
    return found is not None and not found.local_file
