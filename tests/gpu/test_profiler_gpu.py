"""``%%harp profile`` on a real GPU: CUDA-event timings of real kernels on two streams, checked
against what the notebook's own clock saw and against the kernels' known cycle counts; a loop of
tiny launches timed per batch and stream, and per launch when asked."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from gpu_agent.profiling import BATCH_SPAN, PER_OP_UP_TO
from harp_jupyter.profiler.display import ProfileResult
from harp_jupyter.profiler.profile import profiled

SPIN = """
__global__ void spin(long long cycles, int *out)
{
    long long start = clock64();
    while (clock64() - start < cycles) { }
    out[threadIdx.x] = 1;
}
"""
CYCLES = 20_000_000


def test_gpu_timings_of_real_kernels_line_up_with_the_notebooks_clock(
        gpu_shim_cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    cuda = gpu_shim_cuda
    spin = SourceModule(SPIN).get_function("spin")
    out = cuda.mem_alloc(4 * 32)
    clock_khz = cuda.Context.get_device().get_attribute(cuda.device_attribute.CLOCK_RATE)

    def cell() -> None:
        s1, s2 = cuda.Stream(), cuda.Stream()
        spin(np.int64(CYCLES), out, block=(32, 1, 1), grid=(1, 1), stream=s1)
        spin(np.int64(CYCLES), out, block=(32, 1, 1), grid=(1, 1), stream=s2)
        cuda.Context.synchronize()

    # twice: the second profile records its timings on the CUDA events of the first
    for _ in range(2):
        _, profile = profiled(cell)
        result = ProfileResult(profile)
        events = result.trace["traceEvents"]
        kernels = [e for e in events if e.get("cat") == "gpu" and e["name"] == "spin"]
        assert len(kernels) == 2 and len({e["tid"] for e in kernels}) == 2  # one per stream
        blocked = [e for e in events if e.get("cat") == "sync" and e["name"] == "wait: synchronize"]
        assert len(blocked) == 1
        wait_start, wait_end = blocked[0]["ts"], blocked[0]["ts"] + blocked[0]["dur"]
        error_us = max(a["clock_error_us"] for a in result.summary["agents"].values())
        shortest_us = CYCLES / clock_khz * 1e3  # clock64 cannot tick faster than the max clock
        for kernel in kernels:
            assert kernel["dur"] >= shortest_us * 0.999, (kernel, shortest_us)
            # it ran after the notebook issued it and before the synchronize returned
            assert 0 - error_us <= kernel["ts"]
            assert kernel["ts"] + kernel["dur"] <= wait_end + error_us, (kernel, wait_end)
        # the notebook waited at least as long as the later kernel still had to run
        last_end = max(k["ts"] + k["dur"] for k in kernels)
        assert wait_end + error_us >= last_end and wait_start <= last_end + error_us
        assert result.summary["gpu_timing"] is True and result.summary["emulated"] is False
        top = result.summary["top_kernels"][0]
        assert top["name"] == "spin" and top["count"] == 2


TINY = """
__global__ void add_one(float *x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
"""


@pytest.mark.parametrize("per_op", [False, True])
def test_a_launch_loop_is_timed_per_batch_and_stream_with_real_events(
        gpu_shim_cuda: ModuleType, per_op: bool) -> None:
    """A loop of tiny launches: one CUDA event pair per batch and stream (the default), or
    per launch with --per-op-gpu-timing; either way every launch is covered once, and the GPU
    spans lie inside the profile, before the synchronize returned."""
    from pycuda.compiler import SourceModule

    cuda = gpu_shim_cuda
    add_one = SourceModule(TINY).get_function("add_one")
    x = cuda.mem_alloc(4 * 1024)
    n, launches = np.int32(1024), 500

    def cell() -> None:
        for _ in range(launches):
            add_one(x, n, block=(256, 1, 1), grid=(4, 1))
        cuda.Context.synchronize()

    for _ in range(2):  # the second profile records on the first one's CUDA events
        _, profile = profiled(cell, per_op=per_op)
        result = ProfileResult(profile)
        gpu = [e for e in result.trace["traceEvents"] if e.get("cat") == "gpu"]
        spans = [e for e in gpu if e["args"]["op"] == BATCH_SPAN]
        single = [e for e in gpu if e["args"]["op"] != BATCH_SPAN]
        assert sum(e["args"]["ops"] for e in spans) + len(single) == launches
        assert all(e["name"] == "add_one" for e in single)
        if per_op:
            assert not spans and len(single) == launches
        else:
            # the launches of a batch with more than PER_OP_UP_TO are one span
            launches_per_batch = [b.ops.count("launch") for b in profile.recorder.batches]
            assert len(spans) == sum(1 for k in launches_per_batch if k > PER_OP_UP_TO)
            assert all(e["name"].startswith("add_one x") for e in spans)
            assert result.summary["gpu_batched"]["ops"] == sum(
                e["args"]["ops"] for e in spans)
        (wait,) = [e for e in result.trace["traceEvents"]
                   if e.get("cat") == "sync" and e["name"] == "wait: synchronize"]
        error_us = max(a["clock_error_us"] for a in result.summary["agents"].values())
        for e in gpu:
            assert e["dur"] >= 0
            assert -error_us <= e["ts"]
            assert e["ts"] + e["dur"] <= wait["ts"] + wait["dur"] + error_us, (e, wait)
