"""``%%harp profile`` on a real GPU: CUDA-event timings of real kernels on two streams, checked
against what the notebook's own clock saw and against the kernels' known cycle counts."""

from __future__ import annotations

from types import ModuleType

import numpy as np

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
