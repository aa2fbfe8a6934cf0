"""The benchmark's workloads, written once against pycuda's API.

``python bench/workloads.py local OUT.json`` runs them with local pycuda;
``python bench/workloads.py shim OUT.json tcp://HOST:PORT [AGENT_PID]`` runs the same code through
HARP's shim against that agent. Each prints nothing but writes its figures as JSON.
``--hot-path-only`` leaves out the long loops (compute-bound, a million launches): a repeated
round of bench/forwarding.py measures only the launch, the read and the copies again.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = """
__global__ void tiny(float *x) { x[threadIdx.x] += 1.0f; }
__global__ void burn(float *x, int iters)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    for (int k = 0; k < iters; ++k) v = v * 0.9999f + 0.0001f;
    x[i] = v;
}
"""
MIB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: the copy sizes of issue 16's target (each at least 0.7x raw pyzmq), with the repetitions
#: whose best is reported; ``copy_key`` names each figure
COPY_SIZES = ((4 << 10, 200), (64 << 10, 100), (1 << 20, 20), (16 << 20, 5), (256 << 20, 3))


def size_label(nbytes: int) -> str:
    return f"{nbytes >> 20}MiB" if nbytes >= MIB else f"{nbytes >> 10}KiB"


def copy_key(direction: str, nbytes: int) -> str:
    return f"{direction}_{size_label(nbytes)}_GBps"


def run_times(once: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Seconds each of ``reps`` calls of ``once()`` took, after ``warmup`` calls not timed."""
    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def tree_cpu(pid: int) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of process ``pid`` and each of its descendants, keyed by
    (pid, start time), from Linux /proc."""
    found: dict[tuple[int, str], float] = {}
    todo = [pid]
    while todo:
        proc = todo.pop()
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
            found[(proc, fields[19])] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{proc}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def cpu_between(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]
                ) -> float:
    """CPU seconds the processes alive at both ``tree_cpu`` samples spent between them: a
    worker started meanwhile (the agent's next spare, creating its CUDA context) is left out."""
    return sum(after[key] - before[key] for key in before.keys() & after.keys())


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def host_copy_GBps(nbytes: int, reps: int) -> float:
    """The best of ``reps`` host-to-host copies of ``nbytes`` (NumPy), in GB/s."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> None:
    hot_path_only = "--hot-path-only" in sys.argv
    mode, out, *target = [arg for arg in sys.argv[1:] if arg != "--hot-path-only"]
    agent_pid = int(target[1]) if len(target) > 1 else None
    if mode == "shim":
        from harp_jupyter.shim import activate

        activate(agent=target[0])
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda
    from pycuda.compiler import SourceModule

    device = cuda.Device(0).name()
    results: dict[str, object] = {"mode": mode, "device": device}
    kernels = "emulated" not in device.lower()  # the emulated agent runs no CUDA C
    if kernels:
        module = SourceModule(SOURCE)
        tiny, burn = module.get_function("tiny"), module.get_function("burn")
    x = cuda.mem_alloc(4 * 1024)
    cuda.memset_d32(x, 0, 1024)

    def launches(n: int, sync_each: bool) -> float:
        for _ in range(100):
            tiny(x, block=(32, 1, 1), grid=(1, 1))
        cuda.Context.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            tiny(x, block=(32, 1, 1), grid=(1, 1))
            if sync_each:
                cuda.Context.synchronize()
        cuda.Context.synchronize()
        return (time.perf_counter() - start) / n * 1e6

    if kernels:
        results["launch_us"] = launches(50_000, False)
        results["launch_sync_each_us"] = launches(5_000, True)

    word = cuda.mem_alloc(4)
    host = np.empty(1, np.float32)
    samples = []
    for _ in range(3000):
        start = time.perf_counter()
        cuda.memcpy_dtoh(host, word)
        samples.append((time.perf_counter() - start) * 1e6)
    samples = samples[200:]
    results["read4_p50_us"] = float(np.percentile(samples, 50))
    results["read4_p99_us"] = float(np.percentile(samples, 99))

    # one copy, finished: an H2D is followed by a synchronize (the shim returns from a small
    # one at once, before it reached the device), as raw pyzmq's put waits for its answer
    for nbytes, reps in COPY_SIZES:
        data = np.ones(nbytes, np.uint8)
        dev = cuda.mem_alloc(data.nbytes)
        for name, copy in (("h2d", lambda d=dev, h=data: (cuda.memcpy_htod(d, h),
                                                          cuda.Context.synchronize())),
                           ("d2h", lambda d=dev, h=data: cuda.memcpy_dtoh(h, d))):
            times = run_times(copy, reps)
            results[copy_key(name, nbytes)] = data.nbytes / min(times) / 1e9
        dev.free()
        if mode == "local":
            results[copy_key("host", nbytes)] = host_copy_GBps(nbytes, reps)

    if not kernels or hot_path_only:
        with open(out, "w") as f:
            json.dump(results, f)
        return
    n = 1 << 20
    big = cuda.mem_alloc(4 * n)
    cuda.memset_d32(big, 0, n)
    burn(big, np.int32(1000), block=(256, 1, 1), grid=(n // 256, 1))
    cuda.Context.synchronize()
    iters = 1000
    while True:  # size the loop so that it runs at least a second on this GPU
        start = time.perf_counter()
        burn(big, np.int32(iters), block=(256, 1, 1), grid=(n // 256, 1))
        cuda.Context.synchronize()
        if time.perf_counter() - start > 0.1:
            break
        iters *= 4
    start = time.perf_counter()
    for _ in range(12):
        burn(big, np.int32(iters), block=(256, 1, 1), grid=(n // 256, 1))
    cuda.Context.synchronize()
    results["compute_s"] = time.perf_counter() - start
    results["compute_iters"] = iters

    if mode == "shim":
        # which side bounds a launch: the client's CPU and the agent's per launch
        client_cpu, agent_cpu = cpu_s(), tree_cpu(agent_pid) if agent_pid else {}
        start = time.perf_counter()
        for _ in range(1_000_000):
            tiny(x, block=(32, 1, 1), grid=(1, 1))
        cuda.Context.synchronize()
        results["million_launches_s"] = time.perf_counter() - start
        results["launch_client_cpu_us"] = cpu_s() - client_cpu
        if agent_pid:
            results["launch_agent_cpu_us"] = cpu_between(agent_cpu, tree_cpu(agent_pid))
        results["client_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
