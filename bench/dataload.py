"""Data-load benchmark: a 4 GiB .npy loaded on the agent (remote.load) against the same file read
by the notebook and uploaded through the shim, with the raw read speed of the disk it lies on.

    python bench/dataload.py [--size-gib 4] [--dir DIR] [--out bench/results/dataload-<gpu>.md]
                             [--emulated]

All in one run, on one machine: the notebook (this process) and the agent (a subprocess) share the
disk, so "the notebook path" pays the file read plus the wire (TCP loopback here) and the agent
path pays the file read plus PCIe. Each is measured cold (the file's pages evicted from the page
cache first: ``/proc/sys/vm/drop_caches`` when writable, else ``posix_fadvise(DONTNEED)`` after an
fsync, which evicts this file's clean pages without privileges) and warm (the file in the page
cache). The disk's raw speed is the same file read with the agent's read pattern (4 threads,
16 MiB preadv) into ordinary host memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from forwarding import ENV, report  # noqa: E402

CHUNK = 16 << 20
THREADS = 4
WARM_RUNS = 3


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[-1].split()
        return f"{out[1]} on {out[0]}"
    except Exception as e:
        return f"unknown ({e})"


def pick_dir(wanted: str | None) -> Path:
    """A directory on a real disk (not tmpfs: that would be memory, not a disk)."""
    candidates = [Path(wanted)] if wanted else [Path("/var/tmp"), REPO, Path.home(),
                                                  Path(tempfile.gettempdir())]
    for candidate in candidates:
        if candidate.is_dir() and not filesystem_of(candidate).startswith("tmpfs"):
            return candidate / "harp-dataload"
    return candidates[-1] / "harp-dataload"


def write_file(path: Path, size: int) -> np.ndarray:
    """A float32 .npy of ``size`` data bytes; returns its first and last 1 MiB for checks."""
    count = size // 4
    header = {"descr": "<f4", "fortran_order": False, "shape": (count,)}
    block = np.arange(CHUNK // 4, dtype=np.float32)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in range(0, count, block.size):
            n = min(block.size, count - i)
            (block[:n] + np.float32(i % 1_000_003)).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    head = np.fromfile(path, np.float32, count=1 << 18, offset=128)
    tail = np.fromfile(path, np.float32, count=1 << 18, offset=128 + size - (1 << 20))
    return np.concatenate([head, tail])


def evict(path: Path) -> str:
    """Drop ``path``'s pages from the page cache; returns how."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "posix_fadvise(DONTNEED)"


def raw_read_s(path: Path) -> float:
    """Seconds to read the whole file with the agent's read pattern into host memory."""
    size = path.stat().st_size
    buffers = [np.empty(CHUNK, np.uint8) for _ in range(THREADS)]
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(worker: int) -> None:
            view = memoryview(buffers[worker])
            for offset in range(worker * CHUNK, size, THREADS * CHUNK):
                done = 0
                want = min(CHUNK, size - offset)
                while done < want:
                    done += os.preadv(fd, [view[done:want]], offset + done)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(read, range(THREADS)))
        return time.perf_counter() - start
    finally:
        os.close(fd)


def start_agent(emulated: bool, root: Path, reader: str) -> tuple[subprocess.Popen, str, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "--listen", endpoint, "--log-level", "WARNING",
         "--executor", "emulated" if emulated else "pycuda", "--data-root", str(root),
         "--data-reader", reader, "--emulated-memory", "24GiB"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        lines.append(line)
        if not line or "serving" in line:
            break
    if "serving" not in lines[-1]:
        raise SystemExit("agent did not start:\n" + "".join(lines))
    data_line = next((x for x in lines if "data root" in x), "")
    return proc, endpoint, data_line.strip()


def measure_agent(endpoint: str, name: str, path: Path, check: np.ndarray,
                  cold: bool) -> dict[str, Any]:
    from harp_jupyter import remote, shim
    from harp_jupyter.shim.session import get_session, reset_session

    reset_session()
    shim.activate(agent=endpoint)
    try:
        import pycuda.driver as drv

        remote.load_raw(name, np.float32, (1 << 20,), offset=128)  # lease, pinned buffers
        results: dict[str, Any] = {"info": remote.info()}
        runs = []
        for attempt in range(1 + WARM_RUNS if not cold else 1):
            if cold:
                results["evicted_by"] = evict(path)
            gc.collect()
            start = time.perf_counter()
            array = remote.load(name)
            runs.append(time.perf_counter() - start)
            if attempt == 0:
                got = np.empty(check.size, np.float32)
                drv.memcpy_dtoh(got[:1 << 18], array.gpudata)
                drv.memcpy_dtoh(got[1 << 18:], int(array.gpudata) + array.nbytes - (1 << 20))
                results["correct"] = bool(np.array_equal(got, check))
            del array
            get_session().synchronize()
        results["runs_s"] = runs
        results["s"] = runs[0] if cold else statistics.median(runs[1:])
        return results
    finally:
        reset_session()
        shim.deactivate()


def measure_notebook(endpoint: str, path: Path, check: np.ndarray,
                     cold: bool) -> dict[str, Any]:
    """np.load here, then gpuarray.to_gpu through the shim (over the wire)."""
    from harp_jupyter import shim
    from harp_jupyter.shim.session import get_session, reset_session

    reset_session()
    shim.activate(agent=endpoint)
    try:
        import pycuda.gpuarray as gpuarray

        gpuarray.to_gpu(np.zeros(1 << 20, np.float32))  # lease
        results: dict[str, Any] = {}
        runs, reads, uploads = [], [], []
        for attempt in range(1 + WARM_RUNS if not cold else 1):
            if cold:
                evict(path)
            gc.collect()
            start = time.perf_counter()
            host = np.load(path)
            read = time.perf_counter()
            array = gpuarray.to_gpu(host)
            get_session().synchronize()
            done = time.perf_counter()
            runs.append(done - start)
            reads.append(read - start)
            uploads.append(done - read)
            if attempt == 0:
                results["correct"] = bool(np.array_equal(
                    np.concatenate([array[:1 << 18].get(), array[-(1 << 18):].get()]), check))
            del array, host
        pick = (lambda xs: xs[0]) if cold else (lambda xs: statistics.median(xs[1:]))
        results.update(runs_s=runs, s=pick(runs), read_s=pick(reads), upload_s=pick(uploads))
        return results
    finally:
        reset_session()
        shim.deactivate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--dir", default=None, help="where to write the file (a real disk)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--emulated", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = parser.parse_args()

    root = pick_dir(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bench.npy"
    size = int(args.size_gib * (1 << 30))
    started = time.perf_counter()
    check = write_file(path, size)
    write_s = time.perf_counter() - started
    nbytes = path.stat().st_size
    gb = nbytes / 1e9
    raw: dict[str, Any] = {"file": str(path), "filesystem": filesystem_of(root),
                           "bytes": nbytes, "write_s": write_s}

    raw["evicted_by"] = evict(path)
    raw["disk_cold_s"] = raw_read_s(path)
    raw["disk_warm_s"] = statistics.median(raw_read_s(path) for _ in range(WARM_RUNS))

    readers = ["auto"] if args.emulated else ["auto", "kvikio"]
    agents: dict[str, Any] = {}
    notebook: dict[str, Any] = {}
    for reader in readers:
        proc, endpoint, data_line = start_agent(args.emulated, root, reader)
        try:
            agents[reader] = {"agent_line": data_line,
                              "cold": measure_agent(endpoint, path.name, path, check, True),
                              "warm": measure_agent(endpoint, path.name, path, check, False)}
            if reader == "auto":
                notebook = {"cold": measure_notebook(endpoint, path, check, True),
                            "warm": measure_notebook(endpoint, path, check, False)}
        except Exception as e:
            agents[reader] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            proc.terminate()
            proc.wait(30)
    raw.update(agents=agents, notebook=notebook)
    if not args.keep:
        path.unlink()

    device = _device_name(args.emulated)
    auto = agents["auto"]
    disk_cold, disk_warm = gb / raw["disk_cold_s"], gb / raw["disk_warm_s"]
    wire = gb / notebook["warm"]["upload_s"]
    lines = ["| measure | cold cache | warm cache (page cache) | target | |",
             "|---|---|---|---|---|",
             f"| disk read, agent's pattern (GB/s) | {disk_cold:.2f} | {disk_warm:.2f} | | |",
             f"| wire: shim upload of the array over TCP loopback (GB/s) | | {wire:.2f} | | |"]
    for reader, result in agents.items():
        if "error" in result:
            lines.append(f"| agent load, --data-reader {reader} | {result['error']} | | | |")
            continue
        cold_rate, warm_rate = gb / result["cold"]["s"], gb / result["warm"]["s"]
        name = result["cold"]["info"]["reader"]
        reaches = cold_rate >= 0.8 * disk_cold or warm_rate >= 0.8 * disk_warm
        lines.append(f"| agent load `remote.load`, reader {name} (GB/s) | {cold_rate:.2f} | "
                     f"{warm_rate:.2f} | ≥ 80% of disk (cold) or of page cache (warm) | "
                     f"{'PASS' if reaches else 'MISS'} |")
        lines.append(f"| &nbsp;&nbsp;share of disk speed | {cold_rate / disk_cold:.0%} | "
                     f"{warm_rate / disk_warm:.0%} | | |")
    nb_cold, nb_warm = notebook["cold"]["s"], notebook["warm"]["s"]
    lines.append(f"| notebook path: np.load + to_gpu through the shim (s) | {nb_cold:.2f} "
                 f"(read {notebook['cold']['read_s']:.2f} + upload "
                 f"{notebook['cold']['upload_s']:.2f}) | {nb_warm:.2f} (read "
                 f"{notebook['warm']['read_s']:.2f} + upload "
                 f"{notebook['warm']['upload_s']:.2f}) | | |")
    ag_cold, ag_warm = auto["cold"]["s"], auto["warm"]["s"]
    lines.append(f"| agent path (s) | {ag_cold:.2f} | {ag_warm:.2f} | | |")
    # reading then sending costs size/disk + size/wire: the agent path saves the wire term,
    # so it must be faster by at least 1 + disk/wire
    for label, nb, ag, disk in (("cold", nb_cold, ag_cold, disk_cold),
                                ("warm", nb_warm, ag_warm, disk_warm)):
        needed = 1 + disk / wire
        lines.append(f"| speed-up of the agent path, {label} | {nb / ag:.2f}x | | ≥ 1 + "
                     f"disk/wire = {needed:.2f}x | {'PASS' if nb / ag >= needed else 'MISS'} |")
    for link_gbs in (1.25, 2.0):
        model = gb / disk_cold + gb / link_gbs
        lines.append(f"| modelled: notebook path over a {link_gbs * 8:.0f} Gbit/s link, cold (s) "
                     f"| {model:.2f} = {model / ag_cold:.1f}x the agent path | | | |")
    correct = all(r[k].get("correct") for r in [*(a for a in agents.values() if "error" not in a),
                                                 notebook] for k in ("cold", "warm"))
    lines.append(f"| data checked (first and last MiB) | {correct} | | True | "
                 f"{'PASS' if correct else 'MISS'} |")
    intro = (f"File: {nbytes / (1 << 30):.2f} GiB float32 .npy on {raw['filesystem']} "
             f"({path.parent}). Cold runs evict the file's pages first ({raw['evicted_by']}); "
             f"warm runs are the median of {WARM_RUNS} after one warm-up. Agent: "
             f"{auto['agent_line']}. The notebook (this process) and the agent share the "
             "machine: the notebook path's wire is TCP loopback, far faster than a real "
             "network, so the modelled rows give the same read over 10 and 16 Gbit/s links.")
    report("dataload", device, "python bench/dataload.py" + (" --emulated" if args.emulated
                                                              else ""),
           intro, lines, raw, args.out)


def _device_name(emulated: bool) -> str:
    if emulated:
        return "emulated"
    probe = subprocess.run([sys.executable, "-c", "import pycuda.driver as d; d.init(); "
                            "print(d.Device(0).name())"], capture_output=True, text=True,
                           env=ENV, timeout=120)
    return probe.stdout.strip() or "unknown GPU"


if __name__ == "__main__":
    main()
