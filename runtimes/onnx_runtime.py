"""The ONNX Runtime implementation of Runtime: ``instance_count`` sessions on CUDA when it
really works on this machine, else on CPU, each run off the event loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from model_store.datatypes import DataType
from model_store.spec import ModelId, ModelSpec, TensorSpec
from runtimes.base import InferRequest, Runtime, RuntimeMetadata, Tensor
from runtimes.errors import (
    InferenceFailed,
    InvalidTensorError,
    ModelLoadError,
    RuntimeClosedError,
)

log = logging.getLogger(__name__)

CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"

_ORT_TYPES: Final = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(bfloat16)": DataType.BF16,
    "tensor(string)": DataType.BYTES,
}


# With other requests in flight, only runs shorter than this share of ``inline_below_us``
# stay on the event loop: the hand-off to a worker costs the loop about 50-60 µs of CPU
# (measured: submit, wake-up, future chaining), so a run shorter than that is cheaper
# inline even when the loop has other work; a longer one is better run on another core.
BUSY_SHARE: Final = 0.25
# Whatever their length, runs go to the worker while the batches they run hold this many
# requests or more on average (a moving average over runs), until it falls to RELAXED_BATCH.
# Batches that full mean requests reach the batcher faster than the loop serves them: a run
# on the worker lets the loop read the next ones meanwhile, and the batches grow (the
# batched MLP at 32 concurrent requests: 6.9 requests a batch inline, 11.9 on the worker,
# 13-16 % more answers; at 4 and 8, 3.9 a batch, where inline runs answer 7 % more).
CROWDED_BATCH: Final = 6.0
RELAXED_BATCH: Final = 4.0


@dataclass(frozen=True, slots=True)
class OnnxOptions:
    """Settings shared by every ONNX Runtime session: device is auto, cpu or cuda.
    ``inline_below_us``: runs expected to take less than this many microseconds happen on
    the calling (event loop) thread, where a hand-off to a worker thread would cost more
    than the run itself: while other requests are in flight, only runs under BUSY_SHARE of
    it, and none while batches are crowded (CROWDED_BATCH; 0: always a worker thread)."""

    device: str = "auto"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    inline_below_us: int = 0


@functools.cache
def cuda_works() -> tuple[bool, str]:
    """Whether the CUDA provider really runs here, decided once by building a tiny session.
    ONNX Runtime logs loudly when CUDA libraries are missing; that noise is kept from the
    user by raising the logger threshold for the probe only."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])
        active = session.get_providers()
    except Exception as exc:  # any failure means: not usable
        return False, f"CUDA provider failed to start ({exc})"
    finally:
        ort.set_default_logger_severity(3)
    if active and active[0] == CUDA:
        return True, "CUDA provider is active"
    return False, "CUDA libraries (CUDA 13, cuDNN 9) or a GPU are not available"


@functools.cache
def providers_for(device: str) -> tuple[str, ...]:
    """The execution providers to use for ``device``; logs the choice once."""
    if device == "cpu":
        log.info("onnxruntime: using CPUExecutionProvider (device=cpu)")
        return (CPU,)
    works, why = cuda_works()
    if works:
        log.info("onnxruntime: using CUDAExecutionProvider (GPU)")
        return (CUDA, CPU)
    if device == "cuda":
        raise ModelLoadError(f"device=cuda but {why}")
    log.info("onnxruntime: using CPUExecutionProvider (%s)", why)
    return (CPU,)


def session_options(options: OnnxOptions) -> ort.SessionOptions:
    """The options of every serving session. ``modelgate profile`` opens its session with
    them too: the thread count changes float results in the last bits (a multi-threaded
    reduction sums in another order), and a profile must hold the values serving computes."""
    session = ort.SessionOptions()
    session.intra_op_num_threads = options.intra_op_threads
    session.inter_op_num_threads = options.inter_op_threads
    session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session.log_severity_level = 3
    return session


class OnnxRuntime(Runtime):
    """``spec.instance_count`` InferenceSessions of one ONNX file, each owned by one worker
    thread: runs queue in the worker pool itself, so a thread that finishes one run starts
    the next queued one at once, without waiting for the event loop to hand it over."""

    def __init__(
        self, model: ModelId, spec: ModelSpec, path: Path, options: OnnxOptions,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """``in_flight``: how many requests the server has in flight now (all models); a
        run happens on the calling thread only while no request but its own is waiting."""
        self.model = model
        self._in_flight = in_flight
        self.spec = spec
        self._path = path
        self._options = options
        self._pool: ThreadPoolExecutor | None = None
        self._sessions: list[ort.InferenceSession] = []
        self._unowned: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._owned = threading.local()
        self._active = 0  # runs in flight (inline or queued in the pool)
        self._drained: asyncio.Event | None = None
        self._providers: tuple[str, ...] = ()
        self._closed = False
        self._all_outputs = [o.name for o in spec.outputs]
        # With intra-op threads the run's CPU time is spread over ONNX Runtime's own pool,
        # where the calling thread's clock cannot see it: never inline those.
        inline = options.inline_below_us if options.intra_op_threads <= 1 else 0
        self._inline_s = inline / 1e6
        # Until runs were measured (the warm-up measures them), assume they are slow.
        self._run_s = float("inf") if self._inline_s else 0.0
        self._batch = 1.0  # moving average of the requests a run serves
        self._crowded = False  # batches full enough that every run goes to the worker

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        count = max(1, self.spec.instance_count)
        self._pool = ThreadPoolExecutor(count, thread_name_prefix=f"ort-{self.model}")
        try:
            self._providers = providers_for(self._options.device)
            futures = [loop.run_in_executor(self._pool, self._new_session) for _ in range(count)]
            self._sessions = list(await asyncio.gather(*futures))
        except ModelLoadError:
            self._pool.shutdown(wait=False)
            raise
        for session in self._sessions:
            self._unowned.put(session)

    def _new_session(self) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(
                str(self._path), session_options(self._options), providers=list(self._providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"onnxruntime cannot load {self._path.name}: {exc}") from exc
        _check_signature(self.spec, session.get_inputs(), "input", self.spec.inputs)
        _check_signature(self.spec, session.get_outputs(), "output", self.spec.outputs)
        return session

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        if self._closed or self._pool is None:
            raise RuntimeClosedError(f"model {self.model} is not loaded")
        feeds = {name: _to_ort(name, array) for name, array in request.inputs.items()}
        wanted = list(request.outputs) or self._all_outputs
        crowded = self._crowd(request)
        # Inline only while no run of this model is in flight, so no more runs happen at
        # once than there are instances.
        inline = not self._active and self._run_s < self._inline_s and not crowded and (
            self._run_s < self._inline_s * BUSY_SHARE or self._alone(request))
        self._active += 1
        try:
            if inline:
                results, elapsed, request.ran_ns = _timed_run(self._sessions[0], wanted, feeds)
            else:
                loop = asyncio.get_running_loop()
                results, elapsed, request.ran_ns = await loop.run_in_executor(
                    self._pool, self._run_owned, wanted, feeds
                )
        except (InvalidTensorError, RuntimeClosedError):
            raise
        except Exception as exc:  # onnxruntime's own failures (shape errors in ops, OOM...)
            raise InferenceFailed(f"onnxruntime failed: {exc}") from exc
        finally:
            self._active -= 1
            if not self._active and self._drained is not None:
                self._drained.set()
        # A moving average of the runs themselves decides where the next one happens.
        run_s = self._run_s
        self._run_s = elapsed if run_s == float("inf") else 0.8 * run_s + 0.2 * elapsed
        return {name: _from_ort(value) for name, value in zip(wanted, results, strict=True)}

    def _run_owned(self, wanted: list[str], feeds: dict[str, Tensor]) -> _Ran:
        # On a worker thread: the pool has one thread per instance, and each takes one
        # session for good at its first run.
        session: ort.InferenceSession | None = getattr(self._owned, "session", None)
        if session is None:
            session = self._owned.session = self._unowned.get_nowait()
        return _timed_run(session, wanted, feeds)

    def _crowd(self, request: InferRequest) -> bool:
        """Whether batches are full enough that this run goes to the worker (with
        hysteresis, so the runs do not flip between the loop and the worker: that costs
        more than either)."""
        self._batch = 0.9 * self._batch + 0.1 * max(1, len(request.members))
        if self._crowded:
            self._crowded = self._batch > RELAXED_BATCH
        else:
            self._crowded = self._batch >= CROWDED_BATCH
        return self._crowded

    def _alone(self, request: InferRequest) -> bool:
        # With other requests waiting, the event loop has their work to do: a worker thread
        # runs the model meanwhile, on another core. Alone, the hand-off is pure delay.
        if self._in_flight is None:
            return True
        return self._in_flight() <= max(1, len(request.members))

    async def unload(self) -> None:
        self._closed = True
        if self._active:  # the runs in flight finish first
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._sessions.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def metadata(self) -> RuntimeMetadata:
        device = "GPU" if self._providers and self._providers[0] == CUDA else "CPU"
        return RuntimeMetadata(
            model=self.model, platform="onnxruntime_onnx", device=device,
            instances=len(self._sessions),
        )


# A run's outputs, the CPU time it took in its thread, and when it began and ended.
_Ran = tuple[list[Any], float, tuple[int, int]]


def _timed_run(
    session: ort.InferenceSession, wanted: list[str], feeds: dict[str, Tensor]
) -> _Ran:
    """The run's outputs; the CPU time it took in this thread (unlike the wall time, that
    leaves out waiting for the GIL and for a core, which inlining would not save); and its
    start and end (perf_counter ns), which tell the statistics its queue from its run."""
    began, start = time.perf_counter_ns(), time.thread_time()
    results = session.run(wanted, feeds)
    return results, time.thread_time() - start, (began, time.perf_counter_ns())


def _check_signature(
    spec: ModelSpec, actual: Sequence[Any], kind: str, declared: tuple[TensorSpec, ...]
) -> None:
    """A config that does not match its ONNX file fails the load, not the first request."""
    by_name = {a.name: a for a in actual}
    for tensor in declared:
        got = by_name.get(tensor.name)
        if got is None:
            raise ModelLoadError(
                f"config declares {kind} '{tensor.name}' but the ONNX model has "
                f"{', '.join(sorted(by_name))}"
            )
        dtype = _ORT_TYPES.get(got.type)
        if dtype is not tensor.datatype:
            raise ModelLoadError(
                f"{kind} '{tensor.name}': config says {tensor.datatype.value}, "
                f"the ONNX model says {got.type}"
            )
        if dtype is DataType.BF16:
            raise ModelLoadError(
                f"{kind} '{tensor.name}': BF16 tensors are not supported by the onnxruntime "
                "Python runtime"
            )
        shape = [d if isinstance(d, int) else -1 for d in got.shape]
        full = list(spec.full_shape(tensor))
        if len(shape) != len(full) or any(
            s != -1 and f not in (-1, s) for s, f in zip(shape, full, strict=False)
        ):
            raise ModelLoadError(
                f"{kind} '{tensor.name}': config shape {full} does not fit the ONNX shape {shape}"
            )


def _to_ort(name: str, array: Tensor) -> Tensor:
    if array.dtype != object:
        return array
    # ONNX Runtime's Python binding takes str elements for string tensors.
    try:
        return np.vectorize(_decode, otypes=[object])(array) if array.size else array
    except UnicodeDecodeError as exc:
        raise InvalidTensorError(
            f"input '{name}': BYTES elements must be UTF-8 text for an ONNX string input"
        ) from exc


def _decode(value: object) -> object:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _from_ort(value: Any) -> Tensor:
    array = np.asarray(value)
    if array.dtype.kind in "OU":
        return np.vectorize(_encode, otypes=[object])(array) if array.size else array.astype(object)
    return array


def _encode(value: object) -> object:
    return value.encode("utf-8") if isinstance(value, str) else value
