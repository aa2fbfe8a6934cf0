"""pycuda driver-level programs through the shim against a real pycuda agent on a GPU.

References are NumPy results computed here; ``test_same_as_local_pycuda`` also runs one program
with local pycuda in a subprocess and compares bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harp_jupyter.shim.session import reset_session

SAXPY = """
__global__ void saxpy(float *y, const float *x, float a, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
__global__ void gather(float *out, float **ptrs, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ptrs[i % 2][i];
}
__global__ void crash(float *p) { p[threadIdx.x + (1ull << 40)] = 1.0f; }
"""


@pytest.fixture
def cuda(gpu_shim_cuda: ModuleType) -> ModuleType:
    return gpu_shim_cuda

def test_device_is_the_real_gpu(cuda: ModuleType) -> None:
    dev = cuda.Device(0)
    assert "emulated" not in dev.name().lower()
    assert dev.compute_capability()[0] >= 7
    assert dev.get_attribute(cuda.device_attribute.WARP_SIZE) == 32


def test_raw_kernel_with_in_out_and_prepared_call(cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    mod = SourceModule(SAXPY)
    saxpy = mod.get_function("saxpy")
    n = 100_000
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.ones(n, np.float32)
    out = y.copy()
    saxpy(cuda.InOut(out), cuda.In(x), np.float32(2.0), np.int32(n),
          block=(256, 1, 1), grid=((n + 255) // 256, 1))
    np.testing.assert_allclose(out, 2.0 * x + y, rtol=1e-6)

    saxpy.prepare("PPfi")
    x_dev, y_dev = cuda.to_device(x), cuda.to_device(y)
    saxpy.prepared_call(((n + 255) // 256, 1), (256, 1, 1), y_dev, x_dev, 3.0, n)
    np.testing.assert_allclose(cuda.from_device_like(y_dev, y), 3.0 * x + y, rtol=1e-6)


def test_int_pointers_inside_device_memory(cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    gather = SourceModule(SAXPY).get_function("gather")
    n = 4096
    a = np.arange(n, dtype=np.float32)
    b = -np.arange(n, dtype=np.float32)
    a_dev, b_dev = cuda.to_device(a), cuda.to_device(b)
    ptrs = cuda.to_device(np.array([int(a_dev), int(b_dev)], dtype=np.uintp))
    out = cuda.mem_alloc(a.nbytes)
    gather(out, ptrs, np.int32(n), block=(256, 1, 1), grid=(n // 256, 1))
    expected = np.where(np.arange(n) % 2 == 0, a, b)
    np.testing.assert_array_equal(cuda.from_device_like(out, a), expected)


def test_streams_events_and_async_copies(cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    saxpy = SourceModule(SAXPY).get_function("saxpy")
    n = 1 << 22
    streams = [cuda.Stream(), cuda.Stream()]
    hosts = [np.full(n, i + 1, np.float32) for i in range(2)]
    devs = [cuda.mem_alloc(h.nbytes) for h in hosts]
    start, end = cuda.Event(), cuda.Event()
    start.record(streams[0])
    for s, h, d in zip(streams, hosts, devs, strict=True):
        cuda.memcpy_htod_async(d, h, s)
        for _ in range(10):
            saxpy(d, d, np.float32(1.0), np.int32(n), block=(256, 1, 1),
                  grid=(n // 256, 1), stream=s)
    end.record(streams[0])
    results = [cuda.pagelocked_empty_like(h) for h in hosts]
    for s, r, d in zip(streams, results, devs, strict=True):
        cuda.memcpy_dtoh_async(r, d, s)
    for s in streams:
        s.synchronize()
    end.synchronize()
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, np.full(n, (i + 1) * 2.0**10, np.float32))
    assert end.time_since(start) > 0
    assert end.query() and streams[1].is_done()


def test_compile_error_names_the_line(cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    with pytest.raises(cuda.CompileError) as info:  # raised by the call, as pycuda does
        SourceModule("__global__ void broken( { }")
    assert "error" in str(info.value) and "broken" in str(info.value)


def test_out_of_memory_then_still_working(cuda: ModuleType) -> None:
    _free, total = cuda.mem_get_info()
    with pytest.raises(cuda.MemoryError):
        cuda.mem_alloc(total * 2)
        cuda.Context.synchronize()
    a = cuda.to_device(np.arange(10, dtype=np.int64))
    assert cuda.from_device(a, (10,), np.int64).tolist() == list(range(10))


def test_illegal_address_is_reported_and_the_agent_serves_a_new_session(
        gpu_agent: Any, cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    crash = SourceModule(SAXPY).get_function("crash")
    p = cuda.mem_alloc(1024)
    crash(p, block=(32, 1, 1), grid=(1, 1))
    with pytest.raises(cuda.Error) as info:
        cuda.Context.synchronize()
    assert "illegal" in str(info.value).lower() or "reset" in str(info.value).lower()
    reset_session()
    a = cuda.to_device(np.arange(5, dtype=np.float32))
    assert cuda.from_device(a, (5,), np.float32).tolist() == [0, 1, 2, 3, 4]
    assert gpu_agent.process.poll() is None


def test_same_as_local_pycuda(cuda: ModuleType, tmp_path: Any) -> None:
    program = "\n".join([
        "import sys, numpy as np",
        "import pycuda.autoinit, pycuda.driver as cuda",
        "from pycuda.compiler import SourceModule",
        f"f = SourceModule({SAXPY!r}).get_function('saxpy')",
        "x = np.linspace(0, 1, 10000, dtype=np.float32); y = np.sin(x)",
        "f(cuda.InOut(y), cuda.In(x), np.float32(0.5), np.int32(x.size), block=(128, 1, 1),"
        " grid=(79, 1))",
        "np.save(sys.argv[1], y)",
    ])
    script = tmp_path / "prog.py"
    script.write_text(program)
    local = subprocess.run([sys.executable, str(script), str(tmp_path / "local.npy")],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    import runpy

    sys.argv = [str(script), str(tmp_path / "shim.npy")]
    runpy.run_path(str(script), run_name="__main__")
    np.testing.assert_array_equal(np.load(tmp_path / "shim.npy"), np.load(tmp_path / "local.npy"))


def test_allowed_nvcc_options_compile_and_hostile_ones_are_refused(cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    from harp_jupyter.shim.errors import ProtocolError

    major, minor = cuda.Device(0).compute_capability()
    options = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17", "-DSCALE=3.0f",
               "--maxrregcount=64", "--ftz=true", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
    scaled = SourceModule("#include <cuda_fp16.h>\nextern \"C\" __global__ void scale(float *x)"
                          " { x[threadIdx.x] *= SCALE; }", options=options, no_extern_c=True,
                          arch=f"sm_{major}{minor}").get_function("scale")
    x = np.arange(32, dtype=np.float32)
    out = x.copy()
    scaled(cuda.InOut(out), block=(32, 1, 1), grid=(1, 1))
    np.testing.assert_array_equal(out, 3 * x)
    with pytest.raises(ProtocolError, match="--pre-include"):
        SourceModule(SAXPY, options=["--pre-include=/etc/passwd"])


def test_a_source_cannot_include_the_agents_files(cuda: ModuleType) -> None:
    """nvcc runs in a Landlock sandbox: an #include of a file outside the toolkit's and
    pycuda's headers, even through a macro, cannot be opened, so its text never comes back."""
    from pycuda.compiler import SourceModule

    secret = "/etc/passwd"
    with pytest.raises(cuda.CompileError) as info:
        SourceModule(f'#define WHERE "{secret}"\n#include WHERE\n' + SAXPY)
    assert "Permission denied" in str(info.value)
    with open(secret) as f:
        first = f.readline().strip()
    assert first and first not in str(info.value)
