"""Notebook-like workloads, written once against pycuda's API, run locally or through the shim.

    python bench/notebook_workloads.py local
    python bench/notebook_workloads.py shim tcp://HOST:PORT [--worker-host-map A=B]

A long-lived process for bench/network_delay.py: it builds every workload, runs each once (the
warm-up), says ``{"ready": ...}`` as one JSON line on stdout, then answers one JSON line per
command read from stdin (``serve``), so that the driver can interleave the runs of every
configuration round by round. Each run reports its wall time and the CPU time of this process
and of its calling thread. The workloads:

``train_sync``
    A training-like loop: per step a forward matmul (a tiled SourceModule kernel), ``tanh``, the
    error and its gradient as gpuarray/cumath elementwise operations, a backward matmul
    (``X^T D``) and the update ``W -= lr * G``; the loss, ``gpuarray.sum(E * E).get()``, is
    read back every ``EVERY`` steps (a sync point each time). Two model sizes: a matmul-bound
    one (1024) and a launch-bound one (256).
``train_device_loss``
    The same loop rewritten as ``%%harp profile``'s advisor says for a ``.get()`` in a loop:
    each loss stays on the device (``memcpy_dtod`` into a history array) and the history is
    read once after the loop. Same kernels, same losses; one sync point instead of
    ``steps / EVERY``.
``images``
    An image pipeline over two streams: per frame an async copy in from page-locked memory, a
    3x3 blur kernel, an async copy out, alternating streams; after each batch of frames an
    event is recorded on each stream and both are synchronized.
``sync_read`` / ``launch``
    Bare 4-byte ``memcpy_dtoh`` calls (a sync point each) and one small async launch: what the
    workloads above are made of.

Against the emulated agent (its device name says EMULATED) there are no CUDA C kernels: the
matmuls become elementwise products of the same shapes, the blur a ``mul_add`` on the stream,
and the sizes are smaller. Those figures test the plumbing, not a GPU.

``--worker-host-map A=B`` (bench only, see bench/network_delay.py): the shim connects to the
session's worker at host B where the agent advertised host A, so that the data connection goes
through the relay as the supervisor connection does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

KERNELS = """
#define TILE 16
// C (M x N) = A (M x K) . B (K x N), all row-major
__global__ void matmul_nn(const float *A, const float *B, float *C, int M, int N, int K)
{
    __shared__ float As[TILE][TILE], Bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < K; t += TILE) {
        As[ty][tx] = (row < M && t + tx < K) ? A[row * K + t + tx] : 0.0f;
        Bs[ty][tx] = (col < N && t + ty < K) ? B[(t + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}
// C (M x N) = A^T . B where A is stored K x M and B is K x N
__global__ void matmul_tn(const float *A, const float *B, float *C, int M, int N, int K)
{
    __shared__ float As[TILE][TILE], Bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row0 = blockIdx.y * TILE, row = row0 + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < K; t += TILE) {
        As[tx][ty] = (row0 + tx < M && t + ty < K) ? A[(t + ty) * M + row0 + tx] : 0.0f;
        Bs[ty][tx] = (col < N && t + ty < K) ? B[(t + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}
__global__ void blur3(const float *in, float *out, int height, int width)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= width || y >= height) return;
    float sum = 0.0f;
    for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
            int yy = min(max(y + dy, 0), height - 1), xx = min(max(x + dx, 0), width - 1);
            sum += in[yy * width + xx];
        }
    out[y * width + x] = 1.1f * sum / 9.0f;
}
__global__ void tiny(float *x) { x[threadIdx.x] += 1.0f; }
"""

EVERY = 10  # the loss is read back every EVERY steps
LEARNING_RATE = 0.05


class Workloads:
    """The workloads over one pycuda (local or the shim's); ``kernels`` False on the emulated
    agent, where the CUDA C parts have elementwise stand-ins."""

    def __init__(self, cuda: Any, gpuarray: Any, cumath: Any, kernels: bool) -> None:
        self.cuda, self.gpuarray, self.cumath, self.kernels = cuda, gpuarray, cumath, kernels
        if kernels:
            from pycuda.compiler import SourceModule

            module = SourceModule(KERNELS)
            self._matmul_nn = module.get_function("matmul_nn")
            self._matmul_tn = module.get_function("matmul_tn")
            self._blur3 = module.get_function("blur3")
            self._tiny = module.get_function("tiny")

    # {{{ building blocks

    def matmul(self, a: Any, b: Any, out: Any, transpose_a: bool = False) -> None:
        """out = a . b (or a^T . b); an elementwise product of the same shapes when emulated."""
        if not self.kernels:
            self._elementwise_stand_in(a, b, out)
            return
        rows, cols = out.shape
        inner = a.shape[0] if transpose_a else a.shape[1]
        kernel = self._matmul_tn if transpose_a else self._matmul_nn
        kernel(a.gpudata, b.gpudata, out.gpudata, np.int32(rows), np.int32(cols), np.int32(inner),
               block=(16, 16, 1), grid=((cols + 15) // 16, (rows + 15) // 16))

    def _elementwise_stand_in(self, a: Any, b: Any, out: Any) -> None:
        product = a * b
        self.cuda.memcpy_dtod(out.gpudata, product.gpudata, out.nbytes)

    def blur(self, frame: Any, out: Any, stream: Any) -> Any:
        """The frame's 3x3 blur into ``out`` on ``stream``; the array to copy back."""
        if not self.kernels:
            return frame.mul_add(1.1, frame, 0.0, stream=stream)
        height, width = frame.shape
        self._blur3(frame.gpudata, out.gpudata, np.int32(height), np.int32(width),
                    block=(32, 8, 1), grid=((width + 31) // 32, (height + 7) // 8), stream=stream)
        return out

    # }}}

    # {{{ training loop, two ways

    def train(self, size: int, steps: int, device_loss: bool) -> Callable[[], dict[str, Any]]:
        """One training run of ``steps`` steps (model ``size`` x ``size``, batch ``size``);
        the returned callable runs it once from the same start and says what it read."""
        gpuarray, cumath, cuda = self.gpuarray, self.cumath, self.cuda
        rng = np.random.default_rng(7)
        x_host = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
        w_true = rng.standard_normal((size, size)).astype(np.float32)
        y_host = np.tanh(x_host @ w_true).astype(np.float32)
        x, y = gpuarray.to_gpu(x_host), gpuarray.to_gpu(y_host)
        w = gpuarray.zeros((size, size), np.float32)
        z = gpuarray.empty((size, size), np.float32)
        g = gpuarray.empty((size, size), np.float32)
        history = gpuarray.zeros(steps // EVERY, np.float32)
        rate = np.float32(LEARNING_RATE)

        def run() -> dict[str, Any]:
            nonlocal w  # updated in place: `w -= ...` is GPUArray.__isub__
            w.fill(0)
            losses: list[float] = []
            for step in range(1, steps + 1):
                self.matmul(x, w, z)                    # forward
                t = cumath.tanh(z)
                e = t - y
                d = e * (1 - t * t)                     # through tanh
                self.matmul(x, d, g, transpose_a=True)  # backward: X^T D
                w -= g * rate
                if step % EVERY == 0:
                    loss = gpuarray.sum(e * e)
                    if device_loss:  # the advisor's rewrite: keep it on the device
                        slot = int(history.gpudata) + 4 * (step // EVERY - 1)
                        cuda.memcpy_dtod(slot, loss.gpudata, 4)
                    else:  # a sync point every EVERY steps
                        losses.append(float(loss.get()))
            if device_loss:
                losses = [float(v) for v in history.get()]  # the one sync point
            return {"losses": losses, "sync_points": 1 if device_loss else steps // EVERY}

        return run

    # }}}

    def images(self, frames: int, shape: tuple[int, int], batch: int
               ) -> Callable[[], dict[str, Any]]:
        gpuarray, cuda = self.gpuarray, self.cuda
        rng = np.random.default_rng(11)
        host_in = cuda.pagelocked_empty((frames, *shape), np.float32)
        host_in[:] = rng.random((frames, *shape), dtype=np.float32)
        host_out = cuda.pagelocked_empty((frames, *shape), np.float32)
        frame_in = [gpuarray.empty(shape, np.float32) for _ in range(2)]
        frame_out = [gpuarray.empty(shape, np.float32) for _ in range(2)]
        streams = [cuda.Stream(), cuda.Stream()]
        done = [cuda.Event(), cuda.Event()]

        def run() -> dict[str, Any]:
            host_out.fill(0)
            for first in range(0, frames, batch):
                for i in range(first, min(first + batch, frames)):
                    k = i % 2
                    cuda.memcpy_htod_async(frame_in[k].gpudata, host_in[i], streams[k])
                    result = self.blur(frame_in[k], frame_out[k], streams[k])
                    cuda.memcpy_dtoh_async(host_out[i], result.gpudata, streams[k])
                for k in range(2):
                    done[k].record(streams[k])
                for k in range(2):
                    done[k].synchronize()
            return {"checksum": float(host_out.sum(dtype=np.float64)),
                    "sync_points": 2 * -(-frames // batch),
                    "bytes_each_way": int(host_in.nbytes)}

        return run

    def sync_read_us(self, samples: int) -> list[float]:
        """``samples`` bare 4-byte ``memcpy_dtoh`` calls, µs each (after 10 not kept)."""
        word = self.cuda.mem_alloc(4)
        host = np.empty(1, np.float32)
        times = []
        for i in range(samples + 10):
            start = time.perf_counter()
            self.cuda.memcpy_dtoh(host, word)
            if i >= 10:
                times.append((time.perf_counter() - start) * 1e6)
        return times

    def launch_us(self, launches: int = 5000) -> float:
        x = self.cuda.mem_alloc(4 * 32)
        self.cuda.memset_d32(x, 0, 32)
        self._tiny(x, block=(32, 1, 1), grid=(1, 1))
        self.cuda.Context.synchronize()
        start = time.perf_counter()
        for _ in range(launches):
            self._tiny(x, block=(32, 1, 1), grid=(1, 1))
        self.cuda.Context.synchronize()
        return (time.perf_counter() - start) / launches * 1e6


def map_worker_host(mapping: str) -> None:
    """Bench-only: connect to workers advertised at host A at host B instead (``A=B``)."""
    import harp_jupyter.shim.agent_link as shim_link

    advertised_host, _, reached_host = mapping.partition("=")
    resolve = shim_link.worker_endpoint

    def through_relay(advertised: str, agent: str) -> str:
        scheme, _, rest = resolve(advertised, agent).partition("://")
        host, _, port = rest.rpartition(":")
        return f"{scheme}://{reached_host if host == advertised_host else host}:{port}"

    shim_link.worker_endpoint = through_relay


def setup(work: Workloads) -> tuple[dict[str, Callable[[], dict[str, Any]]], dict[str, Any]]:
    """The workloads by name, each run once (the warm-up), and their shapes."""
    if work.kernels:
        models = {"1024": (1024, 200), "256": (256, 400)}
        image_frames, image_shape = 32, (512, 512)
    else:
        models = {"256": (256, 200)}  # 20 sync points: enough for the per-sync-point table
        image_frames, image_shape = 16, (256, 256)
    runs: dict[str, Callable[[], dict[str, Any]]] = {}
    shapes: dict[str, Any] = {}
    for name, (size, steps) in models.items():
        runs[f"train_sync_{name}"] = work.train(size, steps, device_loss=False)
        runs[f"train_device_loss_{name}"] = work.train(size, steps, device_loss=True)
        shapes[f"train_{name}"] = {"size": size, "steps": steps}
    runs["images"] = work.images(image_frames, image_shape, batch=8)
    shapes["images"] = {"frames": image_frames, "shape": list(image_shape), "batch": 8}
    for run in runs.values():
        run()
    return runs, shapes


def _shim_counters() -> dict[str, int]:
    """The shim session's batches sent, sync points and parks so far."""
    from harp_jupyter.shim.session import get_session

    session = get_session()
    writer = session.current_writer()
    return {"batches": writer.batches_sent if writer is not None else 0,
            "shim_sync_points": session.sync_points, "parks": session.parks}


def timed(run: Callable[[], dict[str, Any]], shim: bool) -> dict[str, Any]:
    """One run: its wall time, the CPU time of this process (all its threads: the shim's
    linger thread and ZeroMQ's I/O threads too) and of the calling thread alone, what it read,
    and through the shim the batches it sent, the sync points the shim counted and any park
    (which would spoil the timing)."""
    before = _shim_counters() if shim else None
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    result = run()
    timing = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
              "thread_cpu_s": time.thread_time() - thread}
    if before is not None:
        after = _shim_counters()
        timing.update({k: after[k] - before[k] for k in after})
    return {**timing, **result}


def serve(work: Workloads, device: str, mode: str, reply: TextIO) -> None:
    """Answer the driver's commands, one JSON line each way, until stdin closes:
    ``{"run": NAME}`` one timed run of a workload, ``{"probe": "sync_read", "samples": N}``
    4-byte sync reads (µs each), ``{"probe": "launch"}`` a small async launch (µs, kernels
    only)."""
    runs, shapes = setup(work)

    def say(message: dict[str, Any]) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    say({"ready": True, "mode": mode, "device": device, "kernels": work.kernels,
         "every": EVERY, "workloads": list(runs), "shapes": shapes})
    for line in sys.stdin:
        command = json.loads(line)
        if "run" in command:
            say(timed(runs[command["run"]], shim=mode == "shim"))
        elif command.get("probe") == "sync_read":
            say({"us": work.sync_read_us(int(command.get("samples", 200)))})
        elif command.get("probe") == "launch":
            say({"us": work.launch_us() if work.kernels else None})
        else:
            raise SystemExit(f"unknown command {command!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["local", "shim"])
    parser.add_argument("agent", nargs="?", help="tcp://HOST:PORT (shim mode)")
    parser.add_argument("--worker-host-map", metavar="A=B", default=None)
    args = parser.parse_args()
    # the replies get stdout's file; anything else written to fd 1 (a library's print, a C
    # warning) goes to stderr instead of into the driver's JSON
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.mode == "shim":
        from harp_jupyter.shim import activate

        if args.worker_host_map:
            map_worker_host(args.worker_host_map)
        activate(agent=args.agent)
    import pycuda.autoinit  # noqa: F401
    import pycuda.cumath as cumath
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    device = cuda.Device(0).name()
    kernels = "emulated" not in device.lower()  # the emulated agent runs no CUDA C
    serve(Workloads(cuda, gpuarray, cumath, kernels), device, args.mode, reply)


if __name__ == "__main__":
    main()
