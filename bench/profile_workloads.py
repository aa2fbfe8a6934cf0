"""Profiling-cost workloads, run in their own process: ``python bench/profile_workloads.py MODE
OUT.json [ENDPOINT]``.

Two cells, each timed end to end (issue to synchronize): launch-bound (many tiny kernel launches)
and compute-bound (a few kernels that spin a fixed number of GPU cycles). ``local``: local pycuda.
``shim``: through the shim against the agent at ENDPOINT, without and with ``%%harp profile``
(the profiled time includes collecting the GPU timings, building the timeline and the display
bundle), and the steps in between (``shim``'s docstring).

Against an emulated agent (which runs no CUDA C) the cells are their emulated-friendly twins:
the launch-bound cell issues as many small async memsets (a GPU op per call, like a launch),
the compute-bound one a few large memsets; only the notebook's and the agent's own costs mean
anything there.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

KERNELS = """
__global__ void add_one(float *x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
__global__ void spin(long long cycles, float *x)
{
    long long start = clock64();
    while (clock64() - start < cycles) { }
    x[threadIdx.x] += 1.0f;
}
"""
LAUNCHES = 2000
SPINS, SPIN_CYCLES = 5, 20_000_000
#: runs of each measure after a warm-up (bench/profiling.py --repeats)
REPEATS = int(os.environ.get("HARP_BENCH_REPEATS") or 5)
#: the emulated compute-bound cell's memsets (64 MiB each)
BIG_MEMSET_WORDS = 16 << 20


def cells(cuda: Any) -> dict[str, Callable[[], None]]:
    from pycuda.compiler import SourceModule

    module = SourceModule(KERNELS)
    add_one, spin = module.get_function("add_one"), module.get_function("spin")
    x = cuda.mem_alloc(4 * 1024)
    n = np.int32(1024)

    def launch_bound() -> None:
        for _ in range(LAUNCHES):
            add_one(x, n, block=(256, 1, 1), grid=(4, 1))
        cuda.Context.synchronize()

    def compute_bound() -> None:
        for _ in range(SPINS):
            spin(np.int64(SPIN_CYCLES), x, block=(32, 1, 1), grid=(1, 1))
        cuda.Context.synchronize()

    return {"launch_bound": launch_bound, "compute_bound": compute_bound}


def emulated_cells(cuda: Any) -> dict[str, Callable[[], None]]:
    """The two cells with memsets for kernels (the emulated agent refuses CUDA C)."""
    x = cuda.mem_alloc(4 * 1024)
    big = cuda.mem_alloc(BIG_MEMSET_WORDS * 4)

    def launch_bound() -> None:
        for _ in range(LAUNCHES):
            cuda.memset_d32_async(x, 1, 1024)
        cuda.Context.synchronize()

    def compute_bound() -> None:
        for _ in range(SPINS):
            cuda.memset_d32_async(big, 1, BIG_MEMSET_WORDS)
        cuda.Context.synchronize()

    return {"launch_bound": launch_bound, "compute_bound": compute_bound}


def timed(run: Callable[[], Any]) -> float:
    run()  # warm: module loads, first allocations
    samples = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def local() -> dict[str, Any]:
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    return {name: timed(cell) for name, cell in cells(cuda).items()} | {
        "device": cuda.Device(0).name()}


def timed_together(variants: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """``timed`` of each variant, run in turns (one of each per round), so that a machine
    whose speed drifts during the run shifts them all alike."""
    for run in variants.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(REPEATS):
        for name, run in variants.items():
            t = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


def shim(endpoint: str) -> dict[str, Any]:
    """Per cell: without the profile; under it with agent timings only (``_agent_timing``),
    with GPU timings (``_gpu_timing``), both without building the result; the whole profile
    (``_profiled``: the cell, collecting the timings, the timeline, summary and advice and the
    display bundle the notebook shows) and the same with every GPU op timed (``_per_op``)."""
    os.environ["HARP_AGENTS"] = endpoint
    from harp_jupyter import shim as harp_shim

    harp_shim.activate()
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    from harp_jupyter.profiler.display import ProfileResult
    from harp_jupyter.profiler.profile import profiled

    device = cuda.Device(0).name()
    results: dict[str, Any] = {"device": device}
    emulated = "emulated" in device.lower()
    for name, cell in (emulated_cells(cuda) if emulated else cells(cuda)).items():

        def shown(cell: Callable[[], None] = cell, per_op: bool = False) -> ProfileResult:
            result = ProfileResult(profiled(cell, per_op=per_op)[1])
            result._repr_mimebundle_()
            return result

        times = timed_together({
            "": cell,
            "_agent_timing": lambda cell=cell: profiled(cell, gpu_timing=False),
            "_gpu_timing": lambda cell=cell: profiled(cell),
            "_profiled": shown,
            "_per_op": lambda shown=shown: shown(per_op=True)})
        results.update({name + variant: t for variant, t in times.items()})
        result = shown()
        results[f"{name}_trace_events"] = len(result.trace["traceEvents"])
        results[f"{name}_gpu_busy_s"] = result.summary["gpu_busy_s"]
        results[f"{name}_gpu_batched"] = result.summary["gpu_batched"]
        results[f"{name}_per_op_trace_events"] = len(
            shown(per_op=True).trace["traceEvents"])
    return results


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    result = local() if mode == "local" else shim(sys.argv[3])
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
