"""What one kernel launch costs the client: the shim's Python work from the user's call to the
batch leaving, measured without a GPU.

    python bench/launch_cost.py [--launches N] [--runs R] [--profile] [--prepared | --array-op]

Starts a local emulated ``harp-agent`` (over TCP loopback, as the product runs) and times a loop
of small launches through the shim, as ``bench/workloads.py`` does on a GPU, up to the last call
queued (the batches go out on the way, by size and by the linger thread); then waits for the
replies, which are not timed. The emulated agent refuses raw kernels, so each batch is answered
with an error the shim records and this script ignores: the client's side of a launch (argument
packing, queueing, the call site, batching, serialising, the send) is what is measured. Prints
the median and the spread of ``--runs`` runs in µs per launch, wall time, the CPU time of
the client's threads and of the calling thread alone (steadier where other processes share the
cores; the rest is the batches' serialising and sending on the linger thread, and ZeroMQ's);
``--profile`` prints a cProfile of one run instead. ``--array-op`` times ``c = a - b`` on two
256x256 float32 ``GPUArray`` instead of a launch (the step of a launch-bound array loop: a new
result array, its allocation from a chunk already mapped, the call, and the free of the last
one), which the emulated agent runs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import start_agent  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    parser.add_argument("--prepared", action="store_true",
                        help="launch with prepared_async_call instead of __call__")
    parser.add_argument("--array-op", action="store_true",
                        help="time c = a - b on 256x256 float32 GPUArrays instead of a launch")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(HERE.parent))
    agent, endpoint = start_agent(True)
    try:
        run(endpoint, args)
    finally:
        agent.kill()
        agent.wait()


def run(endpoint: str, args: argparse.Namespace) -> None:
    from harp_jupyter.shim import activate

    activate(agent=endpoint)
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    from harp_jupyter.shim.session import get_session

    session = get_session()
    # SourceModule is refused by the emulated agent: a module and function stand-in with a
    # handle the agent does not know; only the client's work is timed
    module = cuda.Module(session, session.new_handle())
    tiny = cuda.Function(module, session.new_handle(), "tiny")
    tiny.prepare("P")
    stream = cuda.Stream()
    x = cuda.mem_alloc(4 * 1024)
    block, grid = (32, 1, 1), (1, 1)
    a, b = (gpuarray.to_gpu(np.ones((256, 256), np.float32)) for _ in range(2))

    def launches(n: int) -> tuple[float, float, float]:
        start, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
        if args.array_op:
            for _ in range(n):
                c = a - b
            del c
        elif args.prepared:
            for _ in range(n):
                tiny.prepared_async_call(grid, block, stream, x)
        else:
            for _ in range(n):
                tiny(x, block=block, grid=grid)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        own = time.thread_time() - own
        try:
            cuda.Context.synchronize()
        except cuda.Error:
            pass  # the refusal of the stand-in kernel
        return elapsed / n * 1e6, cpu / n * 1e6, own / n * 1e6

    launches(1000)  # warm: connection, caches
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        launches(args.launches)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    runs = [launches(args.launches) for _ in range(args.runs)]
    what = ("GPUArray a - b" if args.array_op
            else "prepared_async_call" if args.prepared else "__call__")
    for i, kind in enumerate(("wall", "CPU (all threads of the client)",
                              "CPU (the calling thread)")):
        samples = [r[i] for r in runs]
        print(f"{what}, {kind}: median {statistics.median(samples):.2f} µs per "
              f"{'operation' if args.array_op else 'launch'} "
              f"(min {min(samples):.2f}, max {max(samples):.2f}; {args.runs} runs of "
              f"{args.launches})")


if __name__ == "__main__":
    main()
