"""Lease workloads, run in their own process: ``python bench/lease_workloads.py MODE OUT.json
[ENDPOINT]``.

``local``: local pycuda moves 1 GiB device->host and back (the copies a park and a restore must
do at least). ``shim``: through the shim against the agent at ENDPOINT: the raw lease round trip,
the shim's acquire on a warm agent (release, then the next GPU call's lease + hello + restore of a
small state), and park/restore of 1 GiB of device state with its data checked.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import numpy as np

GIB = 1 << 30


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def local() -> dict[str, Any]:
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    host = np.ones(GIB, np.uint8)
    dev = cuda.mem_alloc(GIB)
    dtoh, htod = [], []
    for _ in range(3):
        t = time.perf_counter()
        cuda.memcpy_dtoh(host, dev)
        dtoh.append(time.perf_counter() - t)
        t = time.perf_counter()
        cuda.memcpy_htod(dev, host)
        htod.append(time.perf_counter() - t)
    return {"dtoh_1GiB_s": statistics.median(dtoh), "htod_1GiB_s": statistics.median(htod),
            "device": cuda.Device(0).name()}


def shim(endpoint: str) -> dict[str, Any]:
    import os

    os.environ["HARP_AGENTS"] = endpoint
    from harp_jupyter import shim as harp_shim

    harp_shim.activate()
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    from harp_jupyter.shim.session import get_session
    from provisioner.lease_client import BlockingLeaseClient

    client = BlockingLeaseClient()
    rtt = []
    for i in range(300):
        t = time.perf_counter()
        lease = client.request(endpoint, f"bench-{i}", "s")
        rtt.append(time.perf_counter() - t)
        assert lease["state"] == "held"
        client.release(endpoint, lease["id"], lease["token"])
    client.close()

    small = gpuarray.to_gpu(np.arange(1000, dtype=np.float32))
    session = get_session()
    watcher = BlockingLeaseClient()
    acquire, cold = [], []
    for i in range(60):
        session.release()
        if i % 2 == 0:  # a warm agent: its spare worker (CUDA context made) is ready
            deadline = time.monotonic() + 30
            while (watcher.status(endpoint)["workers"]["ready_spares"] < 1
                   and time.monotonic() < deadline):
                time.sleep(0.005)
        t = time.perf_counter()
        session.connect()
        (acquire if i % 2 == 0 else cold).append(time.perf_counter() - t)
    watcher.close()
    assert np.array_equal(small.get(), np.arange(1000, dtype=np.float32))

    big = gpuarray.to_gpu(np.arange(GIB // 4, dtype=np.float32))
    cuda.Context.synchronize()
    park, restore = [], []
    for _ in range(3):
        t = time.perf_counter()
        info = session.release()
        park.append(time.perf_counter() - t)
        assert info["bytes"] >= GIB
        t = time.perf_counter()
        session.connect()
        restore.append(time.perf_counter() - t)
    checksum_ok = bool(np.array_equal(big[-5:].get(), np.arange(GIB // 4 - 5, GIB // 4,
                                                                 dtype=np.float32)))
    rtt_p50, rtt_p99 = percentiles(rtt)
    acq_p50, acq_p99 = percentiles(acquire)
    return {
        "device": session.device.get("name"),
        "lease_rtt_p50_ms": rtt_p50 * 1e3, "lease_rtt_p99_ms": rtt_p99 * 1e3,
        "acquire_p50_ms": acq_p50 * 1e3, "acquire_p99_ms": acq_p99 * 1e3,
        "acquire_back_to_back_p50_ms": statistics.median(cold) * 1e3,
        "park_1GiB_s": statistics.median(park), "restore_1GiB_s": statistics.median(restore),
        "park_runs_s": park, "restore_runs_s": restore, "data_intact": checksum_ok,
        "parked_bytes": info["bytes"],
    }


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    result = local() if mode == "local" else shim(sys.argv[3])
    with open(out, "w") as f:
        json.dump(result, f)
