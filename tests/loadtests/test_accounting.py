"""The accounting mode: the buckets a sampled stack falls in, per-thread times from /proc, and
one short real run (``modelgate serve`` and the no-op server under h2load, py-spy attached)
whose report has every figure and a computed closure. Needs h2load and py-spy (the test
extras) and ptrace rights: these tests fail without them. No figure's size is asserted."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from loadtests import accounting, accounting_report
from loadtests.stage_profile import (
    BUCKETS,
    DECODE,
    ENCODE,
    GC,
    GRPC,
    IDLE,
    LOOP_RUNNER,
    NATIVE_OTHER,
    OTHER_OURS,
    OURS,
    PIPELINE,
    RULES,
    TRANSPORT,
    UVLOOP,
    bucket_of,
    parse_frame,
    parse_raw,
    py_spy,
)
from loadtests.thread_cpu import by_group, group_name, spent, thread_times
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
LOOP = [
    "_run_module_as_main (<frozen runpy>:198)",
    "main (gateway/process/cli.py:103)",
    f"run ({LOOP_RUNNER}:53)",
    "Runner.run (asyncio/runners.py:118)",
    "run_until_complete (loop.c:35410)",
    "run_forever (loop.c:33397)",
]


def _bucket(*frames: str) -> str:
    return bucket_of([parse_frame(f) for f in (*LOOP, *frames)])


def test_a_sample_falls_in_the_stage_of_its_innermost_frame_of_ours() -> None:
    decode = _bucket("0x7f17 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so)",
                     "Edge._unary.<locals>.call (gateway/wire/edge.py:219)",
                     "InferenceServicer.ModelInfer (gateway/wire/servicer.py:121)",
                     "RequestDecoder.decode (gateway/wire/codec.py:70)",
                     "PyArray_FromBuffer (numpy/_core/_multiarray_umath.so)")
    assert decode == DECODE
    assert _bucket("InferenceServicer.ModelInfer (gateway/wire/servicer.py:125)",
                   "ResponseEncoder.encode_raw (gateway/wire/codec.py:190)") == ENCODE
    assert _bucket("InferenceServicer.ModelInfer (gateway/wire/servicer.py:120)",
                   "InferencePipeline.infer (gateway/pipeline/pipeline.py:83)") == PIPELINE
    assert _bucket("_lenient.<locals>.deserialize (gateway/wire/edge.py:72)",
                   "PyUpb_Message_FromString (_message.abi3.so)") == DECODE


def test_a_wait_found_active_and_native_work_are_the_transports() -> None:
    # py-spy records a thread only while it is active: one in epoll then is the loop's poll
    # (a poll that returns at once, or the kernel's wake-up), CPU of the loop's own.
    assert _bucket("uv_run (core.c:464)", "uv__io_poll (linux.c:1452)",
                   "epoll_pwait (libc.so.6)") == UVLOOP
    # Only libc below the loop's frames: the loop's own.
    assert _bucket("pthread_cond_timedwait (libc.so.6)", "0x7f176daa3f16 (libc.so.6)") == (
        UVLOOP)
    assert bucket_of([parse_frame("pthread_cond_timedwait (libc.so.6)")]) == NATIVE_OTHER
    assert _bucket("0x7f1763923952 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so)",
                   "eventfd_write (libc.so.6)", "write (libc.so.6)") == GRPC
    assert _bucket("uv__run_idle (loop-watcher.c:68)",
                   "loop_cb_idle_callback (loop.c:92362)") == UVLOOP


def test_the_frames_around_the_loop_are_no_stage() -> None:
    # The no-op server runs its loop from its supervisor: a frame of ours above the loop.
    supervised = [parse_frame(f) for f in (
        "main (loadtests/noop_server.py:190)", "_supervise (loadtests/noop_server.py:108)",
        f"run ({LOOP_RUNNER}:53)", "0x7f17 (grpc/_cython/cygrpc.so)", "recv (libc.so.6)")]
    assert bucket_of(supervised) == GRPC
    handler = [*supervised[:3], parse_frame("_FixedAnswer._infer (loadtests/noop_server.py:66)")]
    assert bucket_of(handler) == OTHER_OURS


def test_every_rule_names_a_file_or_folder_that_exists() -> None:
    for prefix, _, stage in RULES:
        assert (ROOT / prefix).exists(), prefix
        assert stage in OURS


def _loop_samples(*more: str) -> list[str]:
    """Raw lines of the loop thread (id 10): 6 in epoll, 3 decoding, 1 in grpc's write;
    ``more`` are further stacks below the loop, each ending in its count."""
    loop = ";".join(LOOP)
    return [f"thread (10): MainThread;{loop};{stack}" for stack in (
        "epoll_pwait (libc.so.6) 6",
        "RequestDecoder.decode (gateway/wire/codec.py:70) 3",
        "0x1 (grpc/_cython/cygrpc.so);write (libc.so.6) 1",
        *more)]


def test_raw_output_is_reduced_to_the_loop_threads_buckets() -> None:
    raw = "\n".join([
        *_loop_samples(),
        "thread (11): ort-mlp/1_0;Thread.run (threading.py:982);run (onnxruntime/x.py:9) 40",
    ])
    # Sampled 20 times: the loop thread was found active in 10 of them.
    profile = parse_raw(raw, 10, 20)
    assert profile.samples == 20
    assert profile.share(IDLE) == pytest.approx(0.5)
    assert profile.buckets[UVLOOP] == 6
    assert profile.buckets[DECODE] == 3 and profile.buckets[GRPC] == 1
    assert profile.thread_names == {10: "MainThread", 11: "ort-mlp/1_0"}
    assert profile.functions["RequestDecoder.decode (gateway/wire/codec.py)"] == 3
    assert profile.kernel == {UVLOOP: 6, GRPC: 1}  # the samples whose leaf is a system call


def test_samples_in_a_system_call_stand_for_the_kernels_measured_share() -> None:
    # malloc is no system call: a user-space sample, like the decoder's.
    raw = "\n".join(_loop_samples("0x1 (grpc/_cython/cygrpc.so);malloc (libc.so.6) 2"))
    profile = parse_raw(raw, 10, 12)
    assert profile.kernel_share == pytest.approx(7 / 12)
    # Unscaled: each bucket's share of the samples.
    assert profile.busy_split()[UVLOOP] == pytest.approx(6 / 12)
    # The kernel counted 20 % of the thread's CPU as system time: the 7 samples in a
    # system call share those 20 %, the 5 others the remaining 80 %.
    split = profile.busy_split(0.2)
    assert split[UVLOOP] == pytest.approx(0.2 * 6 / 7)
    assert split[GRPC] == pytest.approx(0.2 * 1 / 7 + 0.8 * 2 / 5)
    assert split[DECODE] == pytest.approx(0.8 * 3 / 5)
    assert sum(split.values()) == pytest.approx(1.0)
    assert profile.user_sample_weight(0.2) == pytest.approx(0.8 / 5)
    assert profile.user_sample_weight() == pytest.approx(1 / 12)


def test_thread_times_count_a_busy_threads_cpu() -> None:
    stop, started = threading.Event(), threading.Event()

    def spin() -> None:
        started.set()
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        started.wait()
        tid, pid = worker.native_id, os.getpid()
        assert tid is not None
        before = thread_times(pid)
        assert tid in before and pid in before
        assert before[pid].user_ns + before[pid].system_ns > 0  # this process has run
        wait_until(lambda: spent(before, thread_times(pid))[tid].cpu_ns > 0,
                   "the spinning thread charged CPU")
    finally:
        stop.set()
        worker.join()
    # Python's join returns a moment before the kernel lets the thread go.
    wait_until(lambda: tid not in thread_times(pid), "the ended thread leaves /proc")
    groups = by_group({tid: before[tid], pid: before[pid]}, {tid: "pool_3", pid: "loop"})
    assert groups["pool"][1] == 1 and groups["loop"][1] == 1
    assert group_name("ort-mlp/1_0") == "ort-mlp/1"
    assert group_name("event_engine") == "event_engine"


def test_a_short_run_reports_every_figure_and_its_closure(tmp_path: Path) -> None:
    assert py_spy() is not None, "py-spy missing: pip install -e '.[test]'"
    out = tmp_path / "accounting.json"
    code = accounting.main(["--concurrency", "4", "--warmup", "0.5", "--plain", "1",
                            "--profile", "1", "--rate", "50", "--json", str(out)])
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [(lv["server"], lv["concurrency"]) for lv in levels] == [
        (accounting.GATEWAY, 4), (accounting.NOOP, 4)]
    for level in levels:
        assert level["errors"] == {}
        assert set(level["stages"]) == set(BUCKETS)
        assert level["samples"] > 0 and level["loop_cpu_us"] > 0
        assert accounting.LOOP in level["threads"]
        assert level["stages_sum_us"] == pytest.approx(sum(level["stages"].values()))
        assert level["closure"] > 0
        assert 0 <= level["kernel_sampled"] <= 1 and 0 <= level["kernel_measured"] <= 1
        assert level["closes"] == (abs(level["closure"] - 1) <= accounting_report.CLOSES_WITHIN)
    gateway, noop = levels
    # Only the gateway runs code of ours on its loop; both run the transport, and the
    # collector runs in any Python process, so it is left out of the comparison.
    gateway_only = [b for b in OURS if b not in (OTHER_OURS, GC)]
    assert sum(gateway["stages"][b] for b in gateway_only) > 0
    assert sum(noop["stages"][b] for b in gateway_only) == 0
    assert sum(noop["stages"][b] for b in TRANSPORT) > 0
    assert code == (0 if all(lv["closes"] for lv in levels) else 1)
    assert report["machine"]["command"].startswith(".venv/bin/python -m loadtests.accounting")
