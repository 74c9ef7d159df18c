"""The sampler and its background worker: the request path hands 1 in N inferences of a
version (within a rows-per-second cap) to a bounded queue; a worker thread folds them into
per-version windowed statistics against the version's reference (profile.json, else the
previous version's live window, else none)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from gateway.models.served import ServedModel, ServedVersion, VersionState
from gateway.monitoring.accumulator import ShapeMismatch, TensorTracker
from gateway.monitoring.profile import PROFILE_FILE, Profile, ProfileError, Role, load
from gateway.monitoring.reference import argmax_outputs, bins_for
from gateway.monitoring.windows import Windows
from gateway.request.context import RequestContext
from gateway.request.inference import Inference
from gateway.settings import Settings
from runtimes.base import InferRequest, Tensor

log = logging.getLogger(__name__)

# Rows a version without a profile collects before its bins are fixed from them.
PROVISIONAL_ROWS: Final = 100
QUEUE_SIZE: Final = 1024
_DRAIN_INTERVAL_S: Final = 0.05
_DRAIN_MAX: Final = 512


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """The monitoring settings (gateway/settings.py: monitoring_*)."""

    enabled: bool = True
    sample_every: int = 10
    max_rows_per_s: int = 1000
    exclude: frozenset[str] = frozenset()
    top_features: int = 20
    queue_size: int = QUEUE_SIZE

    @classmethod
    def from_settings(cls, settings: Settings) -> MonitorConfig:
        return cls(
            enabled=settings.monitoring, sample_every=settings.monitoring_sample_every,
            max_rows_per_s=settings.monitoring_max_rows_per_s,
            exclude=frozenset(settings.monitoring_exclude),
            top_features=settings.monitoring_top_features,
        )


class Gate:
    """One served version's sampling counters, read and written on the event loop only
    (the worker and scrapes only read them)."""

    __slots__ = ("countdown", "dropped_full", "dropped_rate", "enabled", "stamp", "taken",
                 "tokens", "version")

    def __init__(self, version: ServedVersion, enabled: bool, every: int, rate: int) -> None:
        self.version = version
        self.enabled = enabled
        self.countdown = every
        self.taken = 0
        self.dropped_full = 0
        self.dropped_rate = 0
        self.tokens = float(rate)
        self.stamp = time.monotonic()


Sample = tuple[Gate, Mapping[str, Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True, slots=True)
class Reference:
    """What a version's drift is measured against: kind profile | version | none."""

    kind: str
    source: str
    reason: str = ""
    rows: int = 0
    built_from: str = ""  # what the profile says it was built from


@dataclass(slots=True)
class VersionStats:
    """One version's monitoring state, guarded by the monitor's lock; made at its first
    sample or when a report asks for it, whichever comes first."""

    served: ServedVersion
    profile: Profile | None
    reference: Reference
    trackers: dict[tuple[Role, str], TensorTracker] = field(default_factory=dict)
    windows: Windows | None = None
    pending: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]] = field(
        default_factory=list)
    pending_rows: int = 0
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.served.id.name

    @property
    def number(self) -> int:
        return self.served.id.version

    def order(self) -> list[tuple[Role, str]]:
        return list(self.trackers)


class Monitor:
    """Owns the sampling queue, the worker thread and every version's statistics."""

    def __init__(self, config: MonitorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._every = max(1, config.sample_every)
        self._rate = config.max_rows_per_s
        self._capacity = config.queue_size
        self._gates: dict[ServedVersion, Gate] = {}
        self._queue: deque[Sample] = deque()
        self._states: dict[tuple[str, int], VersionStats] = {}
        # Guards the statistics: the worker holds it while it folds samples in, readers
        # (JSON, scrapes) while they merge windows.
        self.lock = threading.Lock()
        # Serialises making a version's state: the worker (a first sample) and readers (a
        # report before any sample) may both find it missing.
        self._making = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the request path -------------------------------------------------------------

    def hooks(self) -> list[Callable[[RequestContext, Inference[ServedVersion]], None]]:
        """The pipeline's post-inference hooks: this monitor's, unless monitoring is off."""
        return [self.hook] if self.config.enabled else []

    def shadow_observer(self, version: ServedVersion, request: InferRequest,
                        outputs: Mapping[str, Tensor]) -> None:
        """Samples shadow answers too: they are what shadow vs primary compares."""
        self.offer(version, request.inputs, outputs, request.rows)

    def hook(self, context: RequestContext, inference: Inference[ServedVersion]) -> None:
        """The pipeline's post-inference hook: samples the version's inputs and outputs."""
        self.offer(inference.version, inference.request.inputs, inference.outputs,
                   inference.request.rows)

    def offer(self, version: ServedVersion, inputs: Mapping[str, Tensor],
              outputs: Mapping[str, Tensor], rows: int) -> bool:
        """Take this inference as a sample if it is due; never blocks, never raises for a
        full queue (the sample is dropped and counted). Returns whether it was queued."""
        gate = self._gates.get(version)
        if gate is None:
            gate = self._gate(version)
        if not gate.enabled:
            return False
        gate.countdown -= 1
        if gate.countdown > 0:
            return False
        gate.countdown = self._every
        if self._rate:
            now = time.monotonic()
            gate.tokens = min(float(self._rate), gate.tokens + (now - gate.stamp) * self._rate)
            gate.stamp = now
            if gate.tokens < rows:
                gate.dropped_rate += 1
                return False
            gate.tokens -= rows
        if len(self._queue) >= self._capacity:
            gate.dropped_full += 1
            return False
        gate.taken += 1
        self._queue.append((gate, inputs, outputs))
        return True

    def _gate(self, version: ServedVersion) -> Gate:
        gate = Gate(version, self.monitored(version.id.name), self._every, self._rate)
        # A reloaded version (new files, a new profile) is a new ServedVersion with the same
        # id: its counters start again, as its statistics do, and its gate replaces the old
        # one, so /metrics never shows two series with the same labels.
        for old in [v for v in self._gates if v.id == version.id]:
            del self._gates[old]
        self._gates[version] = gate
        return gate

    def monitored(self, model: str) -> bool:
        """Whether ``model``'s versions are sampled (monitoring on, the model not excluded)."""
        return self.config.enabled and model not in self.config.exclude

    def gates(self) -> list[Gate]:
        return list(self._gates.values())

    def gate_of(self, served: ServedVersion) -> Gate | None:
        """The sampling counters of ``served`` (None before its first inference)."""
        return self._gates.get(served)

    # ---- the worker -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self.config.enabled:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="drift-monitor",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        # Woken by time, not per sample: the request path pays no wake-up, and a drain
        # folds many samples of a version into one update.
        while not self._stop.wait(_DRAIN_INTERVAL_S):
            try:
                self.drain()
            except Exception:
                log.exception("drift monitor: folding samples in failed")

    def drain(self) -> int:
        """Fold every queued sample in (the worker calls this; tests may too)."""
        done = 0
        while self._queue:
            batch: dict[Gate, list[Sample]] = {}
            while self._queue and len(batch) < _DRAIN_MAX:
                sample = self._queue.popleft()
                batch.setdefault(sample[0], []).append(sample)
                done += 1
                if done % _DRAIN_MAX == 0:
                    break
            for gate, samples in batch.items():
                state = self.track(gate.version)
                with self.lock:
                    self._fold(state, [(s[1], s[2]) for s in samples])
        return done

    def track(self, served: ServedVersion) -> VersionStats:
        """The state of ``served``, made (its reference read, its windows empty) when the
        monitor has none for it yet or has one of the version it replaced (a reload)."""
        key = (served.id.name, served.id.version)
        state = self._states.get(key)
        if state is not None and state.served is served:
            return state
        with self._making:
            state = self._states.get(key)
            if state is not None and state.served is served:
                return state
            fresh = self._new_state(served)
            with self.lock:
                self._states[key] = fresh
            return fresh

    def sync(self, models: Iterable[ServedModel]) -> None:
        """Track each ready version of a monitored model now, before any sample: its
        report names its reference at once, and a reloaded version's starts again."""
        for model in models:
            if not self.monitored(model.name):
                continue
            for served in list(model.versions.values()):  # the loop may add versions
                if served.state is VersionState.READY:
                    self.track(served)

    def _new_state(self, served: ServedVersion) -> VersionStats:
        profile: Profile | None = None
        reference = Reference("none", "", "no profile.json and no earlier version with live "
                                          "statistics")
        path = served.source.parent / PROFILE_FILE if served.source is not None else None
        if path is not None and path.is_file():
            try:
                profile = load(path)
                reference = (Reference("profile", str(path), rows=profile.rows,
                                       built_from=profile.source)
                             if profile.has_reference else
                             Reference("none", str(path), "profile.json has bins only"))
            except ProfileError as exc:
                reference = Reference("none", str(path), f"{PROFILE_FILE}: {exc}")
                log.error("model %s: %s unusable, no reference: %s", served.id, path, exc)
        state = VersionStats(served, profile, reference)
        if profile is not None:
            state.trackers = {(t.role, t.name): TensorTracker(t) for t in profile.tensors}
            state.windows = Windows(list(state.trackers.values()), self._clock)
        elif (earlier := self.previous(served.id.name, served.id.version)) is not None:
            # Binned like the earlier version, so its live window is this one's reference.
            with self.lock:
                state.trackers = {k: TensorTracker(t.profile) for k, t in earlier.trackers.items()}
            state.windows = Windows(list(state.trackers.values()), self._clock)
            state.reference = Reference(
                "version", f"version {earlier.number} (live window)",
                "no profile.json: measured against the earlier version's live statistics")
        return state

    def previous(self, model: str, number: int) -> VersionStats | None:
        """The highest-numbered earlier version of ``model`` with fixed bins."""
        candidates = [s for (m, n), s in list(self._states.items())
                      if m == model and n < number and s.windows is not None]
        return max(candidates, key=lambda s: s.number, default=None)

    def _fold(self, state: VersionStats,
              samples: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]]) -> None:
        batched = state.served.spec.batched
        if state.windows is None:
            state.pending.extend(samples)
            state.pending_rows += sum(_rows(s[0], batched) for s in samples)
            if state.pending_rows < PROVISIONAL_ROWS:
                return
            samples, state.pending, state.pending_rows = state.pending, [], 0
            self._provisional(state, samples)
        assert state.windows is not None
        for index, ((role, name), tracker) in enumerate(state.trackers.items()):
            arrays = [(s[0] if role == "input" else s[1]).get(name) for s in samples]
            present = [_batched(a, batched) for a in arrays if a is not None]
            if not present:
                continue
            stats = tracker.empty()
            try:
                for array in _joined(present):
                    tracker.update(stats, array)
            except (ShapeMismatch, ValueError) as exc:
                state.problems[f"{role} {name}"] = str(exc)
                continue
            state.windows.add(index, stats)

    def _provisional(self, state: VersionStats,
                     samples: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]]) -> None:
        """Fix bins from the first rows of a version with nothing to bin it by."""
        batched = state.served.spec.batched
        names: dict[tuple[Role, str], None] = {}
        for inputs, outputs in samples:
            names.update({("input", n): None for n in inputs})
            names.update({("output", n): None for n in outputs})
        first: dict[tuple[Role, str], Tensor] = {}
        for role, name in names:
            arrays = [_batched(a, batched) for s in samples
                      if (a := (s[0] if role == "input" else s[1]).get(name)) is not None]
            first[(role, name)] = _joined(arrays)[0]
        # As in a profile: no top-1 feature where a label output already is that class.
        repeated = argmax_outputs({n: a for (r, n), a in first.items() if r == "output"})
        for (role, name), array in first.items():
            try:
                state.trackers[(role, name)] = TensorTracker(bins_for(
                    name, role, array, vocabulary=False, top1=name not in repeated))
            except (ShapeMismatch, ValueError) as exc:
                state.problems[f"{role} {name}"] = f"cannot bin: {exc}"
        state.windows = Windows(list(state.trackers.values()), self._clock)

    # ---- readers ----------------------------------------------------------------------

    def states(self) -> list[VersionStats]:
        """Every monitored version, by model and version."""
        return [self._states[k] for k in sorted(list(self._states))]

    def state(self, model: str, number: int) -> VersionStats | None:
        return self._states.get((model, number))

    def queued(self) -> int:
        return len(self._queue)


def _rows(tensors: Mapping[str, Tensor], batched: bool) -> int:
    for array in tensors.values():
        return int(array.shape[0]) if batched and array.ndim else 1
    return 0


def _batched(array: Tensor, batched: bool) -> Tensor:
    return array if batched else np.expand_dims(np.asarray(array), 0)


def _joined(arrays: list[Tensor]) -> list[Tensor]:
    """One array when the samples' shapes agree past the batch axis (the usual case), else
    each on its own."""
    if len(arrays) > 1 and all(a.shape[1:] == arrays[0].shape[1:] and a.dtype == arrays[0].dtype
                               for a in arrays):
        return [np.concatenate(arrays)]
    return arrays
