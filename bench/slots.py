"""Two slots of one GPU: each tenant's compute-bound throughput against running alone.

    python bench/slots.py [--out bench/results/slots-<gpu>.md] [--emulated]

One ``harp-agent --slots 2``; a compute-bound loop (a kernel that spins on arithmetic over 1M
elements; on the emulated executor a NumPy-bound gpuarray loop) runs through the shim in one
process alone, then in two processes at once, each holding a slot. Each tenant's time is reported
against the time alone: two tenants that each keep the GPU busy should each run at about half
speed (the GPU time-slices the two contexts), together about the throughput of one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forwarding import ENV, report, row, start_agent  # noqa: E402

SOURCE = """
__global__ void burn(float *x, int iters)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    for (int k = 0; k < iters; ++k) v = v * 0.999f + 0.001f;
    x[i] = v;
}
"""


def tenant(endpoint: str, iters: int, rounds: int, emulated: bool, out: str) -> None:
    """One tenant: lease a slot through the shim, run the loop, write its wall time."""
    os.environ["HARP_AGENTS"] = endpoint
    from harp_jupyter.shim import activate

    activate()
    import numpy as np
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    n = 1 << 20
    if emulated:
        x = gpuarray.to_gpu(np.ones(n, np.float32))
        x.get()
        start = time.perf_counter()
        for _ in range(rounds * iters):
            x = x * 0.999 + 0.001
        x.get()
    else:
        from pycuda.compiler import SourceModule

        burn = SourceModule(SOURCE).get_function("burn")
        x = cuda.mem_alloc(4 * n)
        cuda.memset_d32(x, 0, n)
        cuda.Context.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            burn(x, np.int32(iters), block=(256, 1, 1), grid=(n // 256, 1))
        cuda.Context.synchronize()
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start,
                                     "device": cuda.Device(0).name()}))


def run_tenants(endpoint: str, count: int, iters: int, rounds: int,
                emulated: bool) -> list[dict[str, Any]]:
    outs = [tempfile.NamedTemporaryFile(suffix=".json", delete=False).name for _ in range(count)]
    procs = [subprocess.Popen([sys.executable, __file__, "--tenant", endpoint, str(iters),
                               str(rounds), str(int(emulated)), out], env=ENV)
             for out in outs]
    for proc in procs:
        if proc.wait(600) != 0:
            raise SystemExit("a tenant failed")
    return [json.loads(Path(out).read_text()) for out in outs]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--tenant":
        endpoint, iters, rounds, emulated, out = sys.argv[2:7]
        tenant(endpoint, int(iters), int(rounds), emulated == "1", out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown file to write (default bench/results/...)")
    parser.add_argument("--emulated", action="store_true",
                        help="smoke run against an emulated agent (no GPU needed)")
    args = parser.parse_args()
    agent, endpoint = start_agent(args.emulated, "--slots", "2", "--spares", "2")
    try:
        iters, rounds = (2, 20) if args.emulated else (200_000, 20)
        alone = run_tenants(endpoint, 1, iters, rounds, args.emulated)[0]
        pair = run_tenants(endpoint, 2, iters, rounds, args.emulated)
    finally:
        agent.kill()
    lines = ["| measure | alone | with a second tenant in the other slot | ratio | target | |",
             "|---|---|---|---|---|---|"]
    for i, result in enumerate(pair):
        lines.append(row(f"tenant {i + 1}: compute-bound loop (s)", f"{alone['seconds']:.3f}",
                         f"{result['seconds']:.3f}", alone["seconds"] / result["seconds"],
                         "reported (throughput vs alone)", None))
    together = sum(alone["seconds"] / r["seconds"] for r in pair)
    lines.append(row("both together: throughput vs one tenant alone", "1.00", "",
                     together, "about 1 (the GPU is shared, not added)", None))
    command = f"python bench/slots.py{' --emulated' if args.emulated else ''}"
    report("slots", alone["device"], command,
           "One agent with --slots 2; the tenants are separate processes leasing through the "
           "shim, measured in this one run.", lines,
           {"alone": alone, "pair": pair}, args.out)


if __name__ == "__main__":
    main()
