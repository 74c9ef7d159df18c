"""One measured load level (requests, latencies, errors by status code, batching) and its
Markdown row: what every benchmark of the project reports and tabulates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from loadtests.drivers import percentile

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class LevelResult:
    """One measured load level of one model (or of the no-op server)."""

    model: str
    # "closed" (fixed concurrency), "open" (fixed arrival rate) or "stream" (ModelStreamInfer
    # streams, each keeping a number of messages in flight; a request is one message)
    mode: str
    load: float  # concurrency, requests per second offered, or streams
    rows_per_request: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list, repr=False)
    errors: dict[str, int] = field(default_factory=dict)
    executions: int | None = None  # batches the server ran during the level, if known
    inferences: int | None = None
    driver: str = "python"  # the load generator: our grpc.aio client, or h2load
    workers: int = 1  # serving processes behind the port
    label: str = ""  # what else sets this level apart (a quota mode, "50 % of peak"...)
    # CPU seconds over the whole level (warm-up included) of the server's processes and of
    # the load generator: on a small machine they show which side was the bottleneck.
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    wall_s: float | None = None  # the level's whole length, warm-up included

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.throughput * self.rows_per_request

    @property
    def mean_batch(self) -> float | None:
        if not self.executions or self.inferences is None:
            return None
        return self.inferences / self.executions

    def cores(self, cpu_s: float | None) -> float | None:
        """CPU seconds as the number of cores busy over the level."""
        return None if cpu_s is None or not self.wall_s else cpu_s / self.wall_s

    def latency_ms(self, p: float) -> float:
        return percentile(self.latencies_s, p) * 1000

    def summary(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data.update(
            requests=self.requests,
            requests_per_s=round(self.throughput, 1),
            rows_per_s=round(self.rows_per_s, 1),
            mean_batch=None if self.mean_batch is None else round(self.mean_batch, 2),
            server_cores=_round(self.cores(self.server_cpu_s)),
            client_cores=_round(self.cores(self.client_cpu_s)),
            **{f"p{p:g}_ms": round(self.latency_ms(p), 3) for p in PERCENTILES},
        )
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_errors(errors: Mapping[str, int]) -> str:
    """``0``, or the count of each status code: ``RESOURCE_EXHAUSTED 3, UNAVAILABLE 1``."""
    shown = {code: n for code, n in sorted(errors.items()) if n}
    return ", ".join(f"{code} {n}" for code, n in shown.items()) if shown else "0"


def load_text(r: LevelResult) -> str:
    if r.mode == "stream":  # load: streams; the label says how many messages each holds
        return f"{int(r.load)} streams{f' x {r.label}' if r.label else ''}"
    return f"{int(r.load)} conc" if r.mode == "closed" else f"{r.load:,.0f} req/s offered"


HEADER = (
    "| model | load | req/s | rows/s | p50 ms | p90 ms | p99 ms | p99.9 ms | mean batch "
    "| errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def format_row(r: LevelResult) -> str:
    batch = "-" if r.mean_batch is None else f"{r.mean_batch:.1f}"
    cells = " | ".join(f"{r.latency_ms(p):.2f}" for p in PERCENTILES)
    return (
        f"| {r.model} | {load_text(r)} | {r.throughput:,.0f} | {r.rows_per_s:,.0f} | "
        f"{cells} | {batch} | {format_errors(r.errors)} |"
    )
