"""One notebook of the elasticity replay: a real shim client, run as ``harp run`` runs a script.

    HARP_AGENTS=tcp://... python -m harp_jupyter.cli run bench/elasticity_session.py \
        replay|calibrate SPEC.json OUT.json

The shim is active (``import pycuda`` is HARP's), and the GPU is leased through the lease keeper
of ``harp_jupyter.shim.lease.DirectLeaseSource``, exactly as a kernel without a provisioner does:
queueing, moves between agents, reclaim by the agent and (``idle_timeout``) the keeper's idle
release.

``replay``: set up the session's data on the GPU (float64 integers from a seed, so that sums are
exact), print ``ready``, wait for ``go T0`` on stdin, then replay the trace: think, then a burst
of GPU work (``n_ops`` in-place gpuarray operations on a scratch array: NumPy on the emulated
executor, CUDA kernels on pycuda's), then add the step's ``bump`` to the data and check the
data's sum and ends against what this process expects, after every burst. At the end every
element of the data is compared. Writes what happened to OUT.json.

``calibrate``: on a dedicated agent, time the operations, size each burst class to its target
duration and time each class alone (the reference of every burst's slowdown).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from typing import Any

import numpy as np

#: elements per host chunk when the data is made and finally compared
CHUNK = 1 << 22
#: elements of the data's ends checked after every burst
ENDS = 64
#: how often a burst's first call may find that the agent parked the session just before it
LEASE_RETRIES = 5


def host_values(seed: int, start: int, stop: int) -> np.ndarray:
    """The data's initial values start..stop: integers 0..999 as float64 (sums stay exact)."""
    index = np.arange(start, stop, dtype=np.int64)
    return ((index * 7919 + seed) % 1000).astype(np.float64)


class Notebook:
    """The session's arrays, what it expects of them, and the timings of its lease."""

    def __init__(self, memory_bytes: int, seed: int, scratch_elems: int) -> None:
        import pycuda.autoinit  # noqa: F401  (the shim's: leases on the first GPU call)
        import pycuda.driver as cuda
        import pycuda.gpuarray as gpuarray

        from harp_jupyter.shim import hooks
        from harp_jupyter.shim.errors import LeaseLostError
        from harp_jupyter.shim.session import get_session, reset_session

        self.cuda, self.gpuarray = cuda, gpuarray
        self.spans: list[tuple[str, float]] = []
        hooks.lease_span = self._span
        self.n = max(memory_bytes // 8, ENDS * 2)
        self.seed = seed
        self.head = host_values(seed, 0, ENDS)
        self.tail = host_values(seed, self.n - ENDS, self.n)
        #: setups started over because calls of theirs met a lease the agent had just ended
        self.setups_redone = 0
        while True:
            self.session = get_session()
            try:
                self._set_up(scratch_elems)
                return
            except LeaseLostError:
                # some allocations or copies did not run: the session's memory is not what
                # this process believes; start over in a new session
                self.setups_redone += 1
                if self.setups_redone > LEASE_RETRIES:
                    raise
                reset_session()

    def _set_up(self, scratch_elems: int) -> None:
        self.bumped = 0
        self.expected_sum = 0.0
        self.lease()
        self.data = self.gpuarray.empty(self.n, np.float64)
        for start in range(0, self.n, CHUNK):
            values = host_values(self.seed, start, min(start + CHUNK, self.n))
            self.expected_sum += float(values.sum())
            self.cuda.memcpy_htod(int(self.data.gpudata) + start * 8, values)
        self.scratch = self.gpuarray.to_gpu(np.full(scratch_elems, 0.5, np.float32))
        problem = self.check(retry=False)
        if problem is not None:
            raise RuntimeError(f"the data were wrong right after they were uploaded: {problem}")

    def _span(self, name: str, start_ns: int, end_ns: int, **_: Any) -> None:
        self.spans.append((name, (end_ns - start_ns) / 1e9))

    def lease(self) -> int:
        """Have the GPU now: lease (and restore) if the session is parked, then one call that
        waits for the agent, so that the burst's work runs on a lease known to be held. A
        burst that finds the session parked by the agent an instant before it retries (the
        count is returned)."""
        from harp_jupyter.shim.errors import GPUUnavailableError, LeaseLostError

        for attempt in range(LEASE_RETRIES):
            try:
                self.session.connect()
                self.cuda.mem_get_info()
                return attempt
            except LeaseLostError:
                continue
            except GPUUnavailableError as e:
                # the keeper asks every agent's status with a 2 s timeout and gives up at once
                # when none answers in time (a loaded machine): ask again
                if not str(e).startswith("no GPU agent answered") or attempt + 1 == LEASE_RETRIES:
                    raise
        raise RuntimeError(f"the lease was lost {LEASE_RETRIES} times in a row before a burst")

    def work(self, n_ops: int) -> int:
        """``n_ops`` in-place operations, then a synchronize. The scratch array's values are a
        fixed point of them (0.5 * 0.5 + 0.25), so a burst whose calls were dropped by a
        reclaim race (see ``bump``) is simply run again. Returns how often that happened."""
        from harp_jupyter.shim.errors import LeaseLostError

        scratch = self.scratch
        for dropped in range(LEASE_RETRIES + 1):
            try:
                for _ in range(n_ops):
                    scratch *= 0.5
                    scratch += 0.25
                self.cuda.Context.synchronize()
                return dropped
            except LeaseLostError:
                self.lease()
        raise RuntimeError("a burst's calls were dropped by reclaims again and again")

    def bump(self, value: int) -> int:
        """Add ``value`` to every element of the data, and check the data. The calls that
        follow a sync point by microseconds can still meet a lease the agent ended (a reclaim
        pushed while they were on their way): they did not run (LeaseLostError). Then the
        session is leased again and the data's sum says whether the one ``+=`` ran; it runs
        again if it did not. Returns how often that happened."""
        from harp_jupyter.shim.errors import LeaseLostError

        n = float(self.n)
        self.data += float(value)
        dropped = 0
        while True:
            try:
                total = float(self.gpuarray.sum(self.data).get())
                break
            except LeaseLostError:
                dropped += 1
                if dropped > LEASE_RETRIES:
                    raise
                self.lease()
                total = float(self.gpuarray.sum(self.data).get())
                if total == self.expected_sum:  # the += did not run: again
                    self.data += float(value)
                    continue
                break
        self.bumped += value
        self.expected_sum += float(value) * n
        return dropped

    def check(self, *, retry: bool = True) -> str | None:
        """What is wrong with the data (None: its sum and both ends are as expected)."""
        from harp_jupyter.shim.errors import LeaseLostError

        for attempt in range(LEASE_RETRIES + 1):
            try:
                total = float(self.gpuarray.sum(self.data).get())
                head = self.data[:ENDS].get()
                tail = self.data[self.n - ENDS:].get()
                break
            except LeaseLostError:  # read-only: read again
                if attempt == LEASE_RETRIES or not retry:
                    raise
                self.lease()
        if total != self.expected_sum:
            return f"sum {total!r} != expected {self.expected_sum!r}"
        if not np.array_equal(head, self.head + self.bumped):
            return "the first elements differ"
        if not np.array_equal(tail, self.tail + self.bumped):
            return "the last elements differ"
        return None

    def check_all(self) -> str | None:
        """Every element against what it must be."""
        for start in range(0, self.n, CHUNK):
            stop = min(start + CHUNK, self.n)
            got = self.data[start:stop].get()
            if not np.array_equal(got, host_values(self.seed, start, stop) + self.bumped):
                bad = int(np.argmax(got != host_values(self.seed, start, stop) + self.bumped))
                return f"element {start + bad} differs"
        return self.check()

    def take_spans(self) -> dict[str, float]:
        spans, self.spans = self.spans, []
        out: dict[str, float] = {}
        for name, seconds in spans:
            key = name.split(" ")[0]
            out[key] = out.get(key, 0.0) + seconds
        return out


def set_acquire_timeout(notebook: Notebook, seconds: float | None) -> None:
    """Give up waiting for a GPU after ``seconds`` (the replay's hard stop): the keeper's own
    acquire timeout (HARP_ACQUIRE_TIMEOUT), set per burst."""
    keeper = getattr(notebook.session.lease_source, "keeper", None)
    if keeper is not None:
        keeper.config.acquire_timeout = None if seconds is None else max(seconds, 0.05)


def replay(spec: dict[str, Any]) -> dict[str, Any]:
    from harp_jupyter.shim.errors import GPUUnavailableError
    from harp_jupyter.shim.lease import get_lease_source

    trace = spec["trace"]
    result: dict[str, Any] = {"session": trace["index"], "bursts": [], "censored": [],
                              "checks_failed": [], "memory_bytes": trace["memory_bytes"]}
    started = time.monotonic()
    notebook = Notebook(trace["memory_bytes"], trace["data_seed"], spec["scratch_elems"])
    result["setup_s"] = time.monotonic() - started
    result["setups_redone"] = notebook.setups_redone
    if spec.get("idle_timeout"):
        get_lease_source().set_idle(float(spec["idle_timeout"]))  # what %harp idle does
    if spec.get("release_after_setup", True):
        notebook.session.release()
    notebook.take_spans()
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    t0 = float(line[1])
    end, hard_stop = t0 + spec["duration_s"], t0 + spec["hard_stop_s"]
    time.sleep(max(t0 - time.monotonic(), 0))
    done_at = t0 + trace["offset_s"]
    for number, step in enumerate(trace["steps"]):
        want = done_at + step["think_s"]
        if want >= end:
            break
        time.sleep(max(want - time.monotonic(), 0))
        set_acquire_timeout(notebook, hard_stop - time.monotonic())
        restores = notebook.session.restores
        try:
            retries = notebook.lease()
        except GPUUnavailableError as e:
            result["censored"].append({"burst": number, "t_want": want,
                                       "waited_s": time.monotonic() - want, "why": str(e)[:200]})
            break
        granted = time.monotonic()
        agent = notebook.session.endpoint
        parks, restores_before = notebook.session.parks, notebook.session.restores
        dropped = notebook.work(spec["n_ops"][step["size_class"]])
        done = time.monotonic()
        # reclaimed inside the burst (its client stalled past reclaim_after between two calls,
        # as a loaded machine can make it): it did not hold its slot from granted to done
        parked_inside = (notebook.session.parks > parks
                         or notebook.session.restores > restores_before)
        dropped += notebook.bump(step["bump"])
        problem = notebook.check()
        if problem is not None:
            result["checks_failed"].append({"burst": number, "problem": problem})
        spans = notebook.take_spans()
        result["bursts"].append({
            "burst": number, "size_class": step["size_class"], "agent": agent,
            "t_want": want, "t_granted": granted, "t_done": done,
            "restored": notebook.session.restores > restores, "lease_retries": retries,
            "dropped_by_reclaim": dropped, "parked_inside": parked_inside,
            "acquire_s": spans.get("acquire", 0.0), "restore_s": spans.get("restore", 0.0)})
        done_at = time.monotonic()
    # the end: every element of the data, whatever the policy (waiting as long as it takes)
    set_acquire_timeout(notebook, spec.get("verify_timeout_s"))
    try:
        notebook.lease()
        problem = notebook.check_all()
        result["verified"] = problem is None
        if problem is not None:
            result["checks_failed"].append({"burst": "final", "problem": problem})
    except GPUUnavailableError as e:
        result["verified"] = False
        result["checks_failed"].append({"burst": "final", "problem": f"no GPU: {e}"[:300]})
    result["parks"], result["restores"] = notebook.session.parks, notebook.session.restores
    return result


def calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """Time a round of operations, size every class, then time each class alone."""
    notebook = Notebook(1 << 20, 1, spec["scratch_elems"])
    notebook.lease()
    notebook.work(4)  # warm: the agent's first kernels compile
    n, seconds = 8, 0.0
    while seconds < spec["calibrate_s"]:
        n *= 2
        started = time.monotonic()
        notebook.work(n)
        seconds = time.monotonic() - started
    per_op = seconds / n
    n_ops = [max(1, round(target / per_op)) for target in spec["classes_s"]]
    alone = []
    for ops in n_ops:
        times = []
        for _ in range(spec["repeats"]):
            started = time.monotonic()
            notebook.work(ops)
            times.append(time.monotonic() - started)
        alone.append(statistics.median(times))
    device = notebook.session.device
    return {"per_op_s": per_op, "n_ops": n_ops, "alone_s": alone,
            "device": str(device.get("name", "?")), "emulated": notebook.session.emulated,
            "check": notebook.check()}


def main() -> None:
    mode, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = replay(spec) if mode == "replay" else calibrate(spec)
    except BaseException as e:  # the benchmark reports it; nothing may go unseen
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
