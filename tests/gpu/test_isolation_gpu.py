"""One tenant can never take the GPU from the others, on a real GPU (pycuda workers).

* A program that fills the GPU's memory and exits, then another program: both succeed (the first
  is ended, not parked, so nothing tries to move ~all of the GPU into host memory).
* An illegal-address kernel in tenant A while B holds the second slot of the same GPU and C is
  parked: A gets a clear error, B's arrays are intact and its work goes on, C comes back intact.
* A kernel that spins past the watchdog ends its session alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpu_agent import protocol as P
from tests.agent_client import RawClient, result_bytes
from tests.conftest import running_agent

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

CRASH = """
__global__ void crash(float *p) { ((float *)0x10)[threadIdx.x] = p[0]; }
__global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def run_program(endpoint: str, source: str, tmp_path: Path, name: str) -> tuple[str, float]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENTS=endpoint)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, time.monotonic() - started


def test_a_program_that_fills_the_gpu_and_exits_then_another_program(tmp_path: Path) -> None:
    with running_agent(executor="pycuda", timeout=180) as agent:
        out, fill_s = run_program(agent.endpoint, """\
            import numpy as np
            import pycuda.autoinit
            import pycuda.driver as cuda
            free, total = cuda.mem_get_info()
            chunk = 1 << 30
            blocks = []
            while free > chunk + (256 << 20):
                blocks.append(cuda.mem_alloc(chunk))
                cuda.memset_d8(blocks[-1], 7, chunk)
                free -= chunk
            cuda.Context.synchronize()
            print("filled", len(blocks) * chunk, "of", total, flush=True)
        """, tmp_path, "fill.py")
        assert "filled" in out
        filled = int(out.split()[1])
        out, next_s = run_program(agent.endpoint, """\
            import numpy as np
            import pycuda.autoinit
            import pycuda.gpuarray as gpuarray
            print(float(gpuarray.sum(gpuarray.to_gpu(np.arange(1000.0))).get()))
        """, tmp_path, "next.py")
        assert out.strip() == "499500.0"
        assert agent.process.poll() is None
        print(f"\nfill-and-exit: {filled / 2**30:.1f} GiB filled in {fill_s:.1f} s; next "
              f"program's first result after {next_s:.2f} s (whole program)")


def test_illegal_address_in_one_slot_leaves_the_neighbour_and_the_parked_intact(
        tmp_path: Path) -> None:
    with running_agent("--slots", "2", executor="pycuda", timeout=180) as agent:
        parked, neighbour = RawClient(agent.endpoint), RawClient(agent.endpoint)
        try:
            base_c = parked.hello()["range"][0]
            reply, _ = parked.batch(["alloc", base_c, P.GRANULARITY],
                                    ["htod", base_c, b"parked!!", None])
            assert reply["e"] is None
            parked.release()
            parked.next_push(P.LOST)
            base_b = neighbour.hello()["range"][0]
            reply, _ = neighbour.batch(["alloc", base_b, P.GRANULARITY],
                                       ["htod", base_b, b"neighbour", None])
            assert reply["e"] is None
            out, _ = run_program(agent.endpoint, f"""\
                import numpy as np
                import pycuda.autoinit
                import pycuda.driver as cuda
                from pycuda.compiler import SourceModule
                crash = SourceModule({CRASH!r}).get_function("crash")
                p = cuda.mem_alloc(1024)
                kept = {{"cpu": 42}}
                crash(p, block=(32, 1, 1), grid=(1, 1))
                try:
                    cuda.Context.synchronize()
                except cuda.Error as e:
                    print("ERROR", type(e).__name__, e)
                print("cpu state", kept["cpu"])
                import pycuda.gpuarray as gpuarray
                print("next", float(gpuarray.to_gpu(np.ones(4)).get().sum()))
            """, tmp_path, "crash.py")
            assert "ERROR" in out and "illegal" in out.lower(), out
            assert "other users of this GPU were not affected" in out
            assert "cpu state 42" in out and "next 4.0" in out
            for _ in range(3):  # the neighbour's data and work go on
                reply, frames = neighbour.batch(["dtoh", base_b, 9, None], ["synchronize"])
                assert reply["e"] is None and result_bytes(reply, frames) == b"neighbour"
            neighbour.release()
            parked.take_lease()
            welcome = parked.hello(resume={"session": parked.welcome["session"],
                                           "resume_token": parked.welcome["resume_token"]})
            assert welcome["t"] == P.WELCOME, welcome
            reply, frames = parked.batch(["dtoh", base_c, 8, None])
            assert reply["e"] is None and result_bytes(reply, frames) == b"parked!!"
            assert agent.process.poll() is None
        finally:
            parked.close()
            neighbour.close()


def test_a_kernel_past_the_watchdog_ends_its_session_alone(tmp_path: Path) -> None:
    with running_agent("--watchdog", "2", executor="pycuda", timeout=180) as agent:
        out, _ = run_program(agent.endpoint, f"""\
            import numpy as np
            import pycuda.autoinit
            import pycuda.driver as cuda
            from pycuda.compiler import SourceModule
            spin = SourceModule({CRASH!r}).get_function("spin")
            spin(np.int64(10**12), block=(1, 1, 1), grid=(1, 1))
            try:
                cuda.Context.synchronize()
            except cuda.Error as e:
                print("ERROR", e)
            import pycuda.gpuarray as gpuarray
            print("next", float(gpuarray.to_gpu(np.ones(4)).get().sum()))
        """, tmp_path, "spin.py")
        assert "ERROR" in out and "watchdog" in out, out
        assert "next 4.0" in out
        assert agent.process.poll() is None
