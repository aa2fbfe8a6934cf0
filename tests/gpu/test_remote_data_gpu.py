"""harp_jupyter.remote on a real GPU: files read by the pycuda agent straight into device memory
(pipelined pinned reads, or kvikio), saved back from it, and the refusals, against NumPy."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harp_jupyter import remote
from harp_jupyter.shim.errors import MemoryError
from harp_jupyter.shim.session import get_session

pytestmark = pytest.mark.timeout(300)

ARRAYS: dict[str, np.ndarray] = {
    "f32": np.random.default_rng(0).standard_normal((513, 257)).astype(np.float32),
    "f64_fortran": np.asfortranarray(np.linspace(-1, 1, 6 * 7 * 5).reshape(6, 7, 5)),
    "i32_large": np.arange(40_000_017, dtype=np.int32),  # 160 MB: many pipeline chunks
    "u8_odd": (np.arange(16_777_216 + 5) % 253).astype(np.uint8),
    "c128": (np.arange(100) - 1j * np.arange(100)).astype(np.complex128),
    "bool": np.arange(1001) % 7 == 0,
}


def kvikio_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import kvikio"], capture_output=True,
                           timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    np.save(root / "images.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    return root


@pytest.fixture(scope="module", params=["auto", "kvikio"])
def pycuda_data_agent(request: pytest.FixtureRequest, data_root: Path) -> Iterator[Any]:
    """One pycuda agent per reader for the module (each start initialises CUDA: seconds)."""
    if request.param == "kvikio" and not kvikio_importable():
        pytest.skip("kvikio is not installed here")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "--listen", endpoint, "--executor", "pycuda",
         "--log-level", "WARNING", "--data-root", str(data_root), "--data-writable",
         "--data-reader", request.param],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("harp-agent: serving"):
            break
    if not lines or not lines[-1].startswith("harp-agent: serving"):
        process.kill()
        pytest.fail("agent did not start:\n" + "".join(lines))
    try:
        yield endpoint, process
    finally:
        alive = process.poll() is None
        process.kill()
        process.wait(30)
        assert alive, "the agent died during the module's tests"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(pycuda_data_agent: Any, data_root: Path,
           shim_at: Callable[[str], Any]) -> Iterator[Path]:
    endpoint, process = pycuda_data_agent
    with shim_at(endpoint):
        yield data_root
    assert process.poll() is None  # the agent lived through the test


def gpuarray() -> Any:
    return importlib.import_module("pycuda.gpuarray")


def test_the_status_says_which_reader_is_in_use(served: Path) -> None:
    info = remote.info()
    assert info["reader"] in ("gds", "pinned-pipeline", "kvikio-compat"), info
    assert info["detail"]
    if info["reader"] != "gds":
        assert "GDS" in info["detail"] or "GPUDirect" in info["detail"]


@pytest.mark.parametrize("name", list(ARRAYS))
def test_save_then_load_round_trips(served: Path, name: str) -> None:
    host = ARRAYS[name]
    remote.save(gpuarray().to_gpu(host), f"{name}.npy")
    on_disk = np.load(served / f"{name}.npy")
    assert on_disk.dtype == host.dtype and np.array_equal(on_disk, host)
    loaded = remote.load(f"{name}.npy")
    assert loaded.shape == host.shape and loaded.strides == host.strides
    assert np.array_equal(loaded.get(), host)
    # and a file NumPy wrote, loaded with a kernel on it
    np.save(served / f"np_{name}.npy", host)
    if host.dtype.kind in "fi":
        np.testing.assert_allclose((remote.load(f"np_{name}.npy") * 2).get(), host * 2)


def test_raw_binary_and_npz(served: Path) -> None:
    values = np.arange(1 << 20, dtype=np.float32)
    (served / "raw.bin").write_bytes(b"\0" * 100 + values.tobytes())
    assert np.array_equal(remote.load_raw("raw.bin", np.float32, (1024, 1024), offset=100).get(),
                          values.reshape(1024, 1024))
    np.savez(served / "set.npz", a=values, b=np.arange(3))
    both = remote.load("set.npz")
    assert np.array_equal(both["a"].get(), values) and np.array_equal(both["b"].get(),
                                                                      np.arange(3))


@pytest.mark.parametrize(("path", "error"), [
    ("../etc/passwd", remote.RemotePathRefusedError),
    ("/etc/passwd", remote.RemotePathRefusedError),
    ("escape.npy", remote.RemotePathRefusedError),
    ("null.npy", remote.RemotePathRefusedError),
    ("missing.npy", remote.RemoteFileNotFoundError),
    ("short.npy", remote.RemoteFormatError),
])
def test_refusals_leave_the_agent_and_session_working(served: Path, path: str,
                                                      error: type[Exception]) -> None:
    for link, target in (("escape.npy", "/etc/passwd"), ("null.npy", "/dev/null")):
        if not os.path.lexists(served / link):
            (served / link).symlink_to(target)
    (served / "short.npy").write_bytes((served / "images.npy").read_bytes()[:-1])
    with pytest.raises(error):
        remote.load(path)
    assert np.array_equal(remote.load("images.npy").get(),
                          np.arange(24, dtype=np.float32).reshape(2, 3, 4))


def test_a_file_larger_than_free_device_memory(served: Path) -> None:
    free, total = get_session().mem_get_info()
    with open(served / "huge.npy", "wb") as f:  # sparse: larger than the GPU, no disk used
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (total + (1 << 30),)})
        f.truncate(f.tell() + total + (1 << 30))
    try:
        with pytest.raises(MemoryError, match="more than the GPU has free"):
            remote.load("huge.npy")
    finally:
        (served / "huge.npy").unlink()
    assert get_session().mem_get_info()[0] >= free - (64 << 20)  # nothing of it stayed
    assert np.array_equal(remote.load("images.npy").get(),
                          np.arange(24, dtype=np.float32).reshape(2, 3, 4))


def test_loaded_arrays_park_and_restore(served: Path) -> None:
    host = ARRAYS["i32_large"]
    np.save(served / "park.npy", host)
    a = remote.load("park.npy")
    pointer = int(a.gpudata)
    session = get_session()
    assert session.release()["bytes"] >= host.nbytes
    assert np.array_equal(a.get(), host)
    assert int(a.gpudata) == pointer


def test_kvikio_is_used_only_where_gds_works(served: Path) -> None:
    if importlib.util.find_spec("kvikio") is None and not kvikio_importable():
        pytest.skip("kvikio is not installed here")
    info = remote.info()
    if not os.path.exists("/proc/driver/nvidia-fs"):
        assert info["reader"] in ("pinned-pipeline", "kvikio-compat")  # never claims GDS
