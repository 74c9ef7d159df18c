"""Where a serving process's event-loop thread spends its time, by sampling: py-spy's native
stacks of the loop thread, each sample put in one bucket (a stage of the request path or
the native transport under no frame of ours); the ticks without a sample are idle.

py-spy runs without ``--idle``, so it records a thread only in the ticks where it finds it
active (running, or runnable and waiting for a core); a stack's leaf tells less: a thread
in ``epoll_wait`` may be sleeping, or doing the kernel's work of a poll that returns at
once, which is CPU. A sample's bucket is decided by its innermost frame of our own code
(gateway/, runtimes/, model_store/, loadtests/): the stage that called whatever runs at the
leaf, native calls included. A sample without such a frame is the transport's and the
loop's own work (grpc's Cython layer and core, uvloop and libuv, the interpreter)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

EDGE, DECODE, PIPELINE, BATCHER = "edge", "decode", "pipeline", "batcher"
HANDOFF, MODEL, OBSERVERS, ENCODE = "runtime hand-off", "model on the loop", "observers", "encode"
GC, OTHER_OURS = "garbage collection", "other (ours)"
GRPC, UVLOOP, NATIVE_OTHER = "grpc (Cython, core)", "uvloop, libuv", "interpreter, other native"
IDLE = "idle"
# The stages of docs/architecture.md's request path, in its order, then the rest.
OURS = (EDGE, DECODE, PIPELINE, BATCHER, HANDOFF, MODEL, OBSERVERS, ENCODE, GC, OTHER_OURS)
TRANSPORT = (GRPC, UVLOOP, NATIVE_OTHER)
BUCKETS = (*OURS, *TRANSPORT)

# (file prefix, function pattern or None for any, stage): the first match of a sample's
# innermost frame of ours decides. Files are as py-spy shortens them (package-relative).
RULES: tuple[tuple[str, str | None, str], ...] = (
    ("gateway/wire/edge.py", r"deserialize|_check_decoded", DECODE),
    ("gateway/wire/edge.py", r"serialize", ENCODE),
    ("gateway/wire/codec.py", r"encode|varint|_length_delimited|_meta|ResponseEncoder|\bof\b",
     ENCODE),
    ("gateway/wire/codec.py", None, DECODE),
    ("gateway/wire/conversion.py", r"encode|_fill_contents|wants_typed", ENCODE),
    ("gateway/wire/conversion.py", None, DECODE),
    ("gateway/wire/rpc_observer.py", None, OBSERVERS),
    ("gateway/wire/stream_observer.py", None, OBSERVERS),
    ("gateway/wire/", None, EDGE),
    ("gateway/http/infer_body.py", None, DECODE),
    ("gateway/http/header_plans.py", None, DECODE),
    ("gateway/http/json_tensors.py", r"encode|respon|output", ENCODE),
    ("gateway/http/json_tensors.py", None, DECODE),
    ("gateway/http/", None, EDGE),
    ("gateway/tenancy/", None, EDGE),
    ("gateway/request/inflight.py", None, EDGE),
    ("gateway/observability/", None, OBSERVERS),
    ("gateway/batching/", None, BATCHER),
    ("runtimes/", None, HANDOFF),
    ("gateway/process/", None, OTHER_OURS),
    ("gateway/", None, PIPELINE),  # pipeline, models, quota, request, monitoring hooks
    ("model_store/", None, PIPELINE),
    ("loadtests/", None, OTHER_OURS),  # the no-op server's handler
)
# The loop thread runs everything under this module's run: it and the frames above it
# (the command's main, the no-op server's supervisor) are no stage.
LOOP_RUNNER = "gateway/process/event_loop.py"
OUR_PACKAGES = ("gateway/", "runtimes/", "model_store/", "loadtests/")
# The C library's system-call wrappers the loop thread is found in: a sample whose leaf is
# one of them was taken in the kernel (the accounting rescales those against /proc's stime,
# since py-spy finds a thread in a system call far more often than it is in one).
SYSCALLS = frozenset({
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "recv",
    "recvfrom", "recvmsg", "send", "sendto", "sendmsg", "read", "readv", "write", "writev",
    "getpid", "gettid", "timerfd_settime", "eventfd_read", "eventfd_write", "syscall",
    "futex", "pthread_cond_signal", "pthread_cond_broadcast", "sem_post", "accept4", "close",
    "ioctl", "madvise", "munmap", "mmap", "brk", "clock_nanosleep", "nanosleep",
})
_FRAME = re.compile(r"^(.*) \(([^()]*)\)$")
_COMPILED = tuple((prefix, re.compile(p) if p else None, stage) for prefix, p, stage in RULES)


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    location: str  # "file:line", "file" or a shared library's name

    @property
    def file(self) -> str:
        head, _, line = self.location.rpartition(":")
        return head if head and line.isdigit() else self.location


def parse_frame(text: str) -> Frame:
    found = _FRAME.match(text)
    return Frame(found.group(1), found.group(2)) if found else Frame(text, "")


def is_ours(frame: Frame) -> bool:
    return frame.file.startswith(OUR_PACKAGES)


def below_loop(frames: list[Frame]) -> list[Frame]:
    """The frames the loop called: those after the innermost one of the loop's runner."""
    for index in range(len(frames) - 1, -1, -1):
        if frames[index].file == LOOP_RUNNER:
            return frames[index + 1:]
    return frames


def stage_of(frame: Frame) -> str:
    """The stage of one frame of ours (OTHER_OURS if no rule names its file)."""
    for prefix, pattern, stage in _COMPILED:
        if frame.file.startswith(prefix) and (pattern is None or pattern.search(frame.function)):
            return stage
    return OTHER_OURS


def in_kernel(frames: list[Frame]) -> bool:
    """Whether a sample's leaf is a system call's wrapper in the C library."""
    return bool(frames) and frames[-1].function in SYSCALLS and (
        frames[-1].file.startswith("libc") or not frames[-1].file)


def bucket_of(frames: list[Frame]) -> str:
    """The bucket of one sample's stack (root first)."""
    frames = below_loop(frames)
    if any(f.function == "gc_collect_main" for f in frames):
        return GC
    if any(f.file.startswith("onnxruntime/") for f in frames):
        return MODEL
    for frame in reversed(frames):
        if is_ours(frame):
            return stage_of(frame)
    for frame in reversed(frames):
        if "cygrpc" in frame.location or frame.function.startswith(("grpc_", "gpr_")):
            return GRPC
        if frame.file == "loop.c" or frame.function.startswith("uv_"):
            return UVLOOP
    return NATIVE_OTHER


@dataclass
class LoopProfile:
    """The loop thread's samples by bucket (idle: the ticks in which py-spy found it
    inactive), Python's names of the threads, and what py-spy reported."""

    buckets: Counter[str] = field(default_factory=Counter)
    # Of each bucket's samples, those taken in a system call (``in_kernel``).
    kernel: Counter[str] = field(default_factory=Counter)
    thread_names: dict[int, str] = field(default_factory=dict)
    errors: int = 0
    # The loop thread's hottest stacks of ours: (innermost frames, samples), for a report.
    functions: Counter[str] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(self.buckets.values())

    def share(self, bucket: str) -> float:
        """The fraction of the loop thread's samples (of its wall time) in ``bucket``."""
        return self.buckets[bucket] / self.samples if self.samples else 0.0

    @property
    def kernel_share(self) -> float:
        """The fraction of the busy samples taken in a system call."""
        busy = sum(self.buckets[b] for b in BUCKETS)
        return sum(self.kernel[b] for b in BUCKETS) / busy if busy else 0.0

    def _weights(self, kernel_share: float | None) -> tuple[float, float]:
        """The fraction of the busy time one sample stands for: (in a system call, in user
        space). Unscaled (no ``kernel_share``, or samples of one kind only) both are
        1 / the busy samples."""
        total = sum(self.buckets[b] for b in BUCKETS)
        kernel = sum(self.kernel[b] for b in BUCKETS)
        if not total:
            return 0.0, 0.0
        if kernel_share is None or not kernel or kernel == total:
            return 1.0 / total, 1.0 / total
        return kernel_share / kernel, (1.0 - kernel_share) / (total - kernel)

    def busy_split(self, kernel_share: float | None = None) -> dict[str, float]:
        """Each bucket's fraction of the busy samples. With ``kernel_share`` (the share of
        the thread's CPU the kernel counted as system time), the samples taken in a system
        call stand for that share and the others for the rest."""
        in_call, in_user = self._weights(kernel_share)
        return {b: self.kernel[b] * in_call + (self.buckets[b] - self.kernel[b]) * in_user
                for b in BUCKETS}

    def user_sample_weight(self, kernel_share: float | None = None) -> float:
        """The fraction of the busy time one user-space sample stands for."""
        return self._weights(kernel_share)[1]


_LINE = re.compile(r"^thread \((\d+)\): ([^;]*);?(.*) (\d+)$")
_ERRORS = re.compile(r"Errors: (\d+)")


def parse_raw(text: str, loop_tid: int, ticks: int) -> LoopProfile:
    """py-spy's ``--format raw --threads`` output (one ``stack count`` line per distinct
    stack, active threads only) reduced to the loop thread's buckets; of ``ticks`` (the
    times py-spy sampled), those without a sample of the loop thread are idle."""
    profile = LoopProfile()
    for line in text.splitlines():
        found = _LINE.match(line.strip())
        if found is None:
            continue
        tid, name, stack, count = found.groups()
        profile.thread_names[int(tid)] = name
        if int(tid) != loop_tid:
            continue
        frames = [parse_frame(part) for part in stack.split(";") if part]
        bucket = bucket_of(frames)
        profile.buckets[bucket] += int(count)
        if in_kernel(frames):
            profile.kernel[bucket] += int(count)
            continue  # the hottest functions are those of user-space samples
        ours = [f for f in below_loop(frames) if is_ours(f)]
        if bucket in OURS and ours:
            profile.functions[f"{ours[-1].function} ({ours[-1].file})"] += int(count)
    # py-spy's ticks are its rate times its duration; a late tick is one fewer, never more.
    profile.buckets[IDLE] = max(0, ticks - profile.samples)
    return profile


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (the test extras install it), or on
    PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, loop_tid: int, seconds: float, rate: int) -> LoopProfile:
    """Samples ``pid``'s active threads (native frames) ``rate`` times a second for
    ``seconds``; needs ptrace rights over ``pid`` (root, or the same user with ptrace_scope
    0)."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("py-spy not found (pip install -e '.[test]' installs it)")
    if not 0 < seconds <= 120 or not 0 < rate <= 1000:
        raise ValueError("py-spy records for (0, 120] seconds at (0, 1000] samples/s")
    duration = max(1, round(seconds))
    with tempfile.TemporaryDirectory(prefix="modelgate-py-spy-") as folder:
        output = Path(folder) / "raw.txt"
        done = subprocess.run(
            [executable, "record", "--pid", str(pid), "--format", "raw", "--threads",
             "--native", "--duration", str(duration), "--rate", str(rate), "--output",
             str(output)],
            capture_output=True, text=True, check=False, timeout=seconds + 60,
        )
        if done.returncode != 0 or not output.exists():
            raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
        raw = output.read_text()
    out, err = done.stdout, done.stderr
    profile = parse_raw(raw, loop_tid, duration * rate)
    errors = _ERRORS.search(out + err)
    profile.errors = int(errors.group(1)) if errors else 0
    if profile.samples == profile.buckets[IDLE]:
        raise RuntimeError(f"py-spy recorded no sample of thread {loop_tid}: {err[-2000:]}")
    return profile
