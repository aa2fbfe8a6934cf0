"""The profile's summary and the sync-point advisor.

The advisor groups the time the notebook spent blocked on the agent by the line of user code that
made it wait, and says, per kind of wait, what to do about it."""

from __future__ import annotations

import linecache
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gpu_agent.profiling import BATCH_SPAN
from harp_jupyter.profiler.profile import Profile
from harp_jupyter.profiler.recorder import Blocked
from harp_jupyter.profiler.trace import named

#: ops whose value the notebook waits for: each is a round trip
_QUESTIONS = frozenset({"mem_get_info", "ping", "get_global", "function_attribute",
                        "stream_query", "event_query", "event_elapsed"})
_SYNCS = frozenset({"synchronize", "stream_synchronize", "event_synchronize"})
TOP = 10
#: GPU spans counted as kernels in the summary (a harp tensor operator is named by its aten op)
_KERNEL_OPS = frozenset({"launch", "elementwise_call", "reduction_call", "array", "torch_op",
                         "torch_op_sync"})
#: harp tensor sync points: what the user wrote, by the aten operator or call it sent
_TORCH_READS = {"aten::_local_scalar_dense": "`.item()`",
                "aten::is_nonzero": "a tensor used as a Python bool (`if t:`, `while t:`)",
                "aten::equal": "`torch.equal`",
                "torch_download": "`.cpu()`, `.tolist()`, `.numpy()` or printing a tensor"}


@dataclass
class Advice:
    site: str
    code: str
    op: str
    why: str
    count: int
    total_s: float
    advice: str

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "code": self.code, "op": self.op, "why": self.why,
                "count": self.count, "total_s": round(self.total_s, 6),
                "mean_ms": round(self.total_s / self.count * 1e3, 3), "advice": self.advice}


def summary(profile: Profile, trace: dict[str, Any]) -> dict[str, Any]:
    rec = profile.recorder
    wall = (profile.ended - profile.started) / 1e9
    gpu_spans = [(e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                 if e.get("cat") == "gpu"]
    wire_spans = [(e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                  if e.get("cat") == "wire"]
    blocked = [(_us(profile, b.start), _us(profile, b.end)) for b in _in_profile(profile)]
    gpu_busy = _union(gpu_spans) / 1e6
    kernels: dict[str, list[float]] = {}
    batched = {"spans": 0, "ops": 0}
    for e in trace["traceEvents"]:
        if e.get("cat") != "gpu":
            continue
        op = e["args"].get("op")
        if op in _KERNEL_OPS:
            entry = kernels.setdefault(e["name"], [0, 0.0])
            entry[0] += 1
            entry[1] += e["dur"] / 1e6
        elif op == BATCH_SPAN:
            batched["spans"] += 1
            batched["ops"] += e["args"].get("ops", 0)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:5]
    calls = [c for c in rec.calls if c.at <= profile.ended]
    emulated = any(info.emulated for info in profile.agents.values())
    return {
        "wall_s": round(wall, 6),
        "gpu_busy_s": round(gpu_busy, 6),
        "gpu_share": round(gpu_busy / wall, 4) if wall > 0 else 0.0,
        "gpu_timing": bool(rec.gpu) and not emulated,
        "emulated": emulated,
        "bytes_up": sum(c.bytes_up for c in calls),
        "bytes_down": sum(c.bytes_down for c in calls),
        "calls": sum(c.count for c in calls),
        "batches": sum(1 for b in rec.batches if b.sent <= profile.ended),
        "sync_points": len(blocked),
        "blocked_s": round(sum(end - start for start, end in blocked) / 1e6, 6),
        "network_wait_s": round(_overlap(blocked, wire_spans) / 1e6, 6),
        "top_kernels": [{"name": name, "count": count, "gpu_s": round(seconds, 6)}
                        for name, (count, seconds) in top],
        # GPU ops timed together, one span per batch and stream: not in top_kernels
        "gpu_batched": batched,
        "agents": {e: {"gpu": i.gpu, "emulated": i.emulated,
                       "clock_error_us": round(i.offset.error_ns / 1e3, 1) if i.offset else None}
                   for e, i in profile.agents.items()},
        "note": trace.get("otherData", {}).get("note", rec.gpu_timing_note),
    }


def advise(profile: Profile) -> list[Advice]:
    groups: dict[tuple[str, int, str, str], list[Blocked]] = {}
    for b in _in_profile(profile):
        site = b.site or ("<unknown>", 0, "")
        groups.setdefault((site[0], site[1], named(b.op, b.detail), b.why), []).append(b)
    advice = []
    for (filename, line, op, why), waits in groups.items():
        total = sum(w.end - w.start for w in waits) / 1e9
        code = linecache.getline(filename, line).strip() if line else ""
        shown = profile.shown_line(filename, line)
        name = profile.cell_name(filename) or _short(filename)
        advice.append(Advice(f"{name}:{shown}", code, op, why, len(waits), total,
                             _what_to_do(op, why, len(waits))))
    advice.sort(key=lambda a: -a.total_s)
    return advice[:TOP]


def _what_to_do(op: str, why: str, count: int) -> str:
    looped = (f" It happened {count} times here: in a loop each wait costs a round trip to "
              "the agent." if count > 1 else "")
    if why == "window":
        return ("More batches were in flight than the send window allows: the agent could not "
                "keep up with the calls (GPU- or network-bound here). Fewer, larger kernels "
                "per call help." + looped)
    if why == "upload":
        return ("Waits until a large host buffer has been sent. Use to_gpu_async / "
                "memcpy_htod_async from page-locked memory to overlap it, or load the data on "
                "the agent with harp_jupyter.remote.load." + looped)
    if op in _TORCH_READS:
        return (f"{_TORCH_READS[op]} copies a value from the GPU to the notebook, so it waits "
                "for all queued GPU work: a round trip." + looped + " Keep the values on the "
                "device (accumulate: `total += loss.detach()`; collect into a tensor) and "
                "read them once after the loop (`total.item()`).")
    if op.startswith("aten::"):
        return (f"{op}'s output shape depends on the data (nonzero, masked_select, indexing "
                "with a boolean mask), so the notebook waits for the GPU to learn it."
                + looped + " Use a form of fixed shape where there is one (torch.where, "
                "multiplying by the mask).")
    if op == "dtoh":
        return ("Copies device data to the notebook, so it waits for all GPU work before it."
                + looped + " Keep intermediate values on the GPU (accumulate into a GPUArray, "
                "use gpuarray.sum/dot) and call .get() once after the loop, or use "
                "get_async(stream) and synchronize once.")
    if op in _SYNCS:
        return ("Waits for all queued GPU work." + looped + " Remove it unless the next line "
                "reads a result; one synchronize at the end is enough.")
    if op in _QUESTIONS:
        return ("Asks the agent for a value: a round trip." + looped + " Ask once, outside the "
                "loop, and reuse the answer.")
    if op == "alloc":
        return ("Waited for device memory to be mapped." + looped + " Allocate once and reuse "
                "the array (or a DeviceMemoryPool) instead of allocating in a loop.")
    return "Waits for the agent's answer to this call." + looped


def _in_profile(profile: Profile) -> Iterable[Blocked]:
    return (b for b in profile.recorder.blocked if b.start <= profile.ended)


def _us(profile: Profile, ns: int) -> float:
    return (ns - profile.started) / 1000.0


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _union(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _merged(spans))


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the union of ``b`` inside the union of ``a``."""
    first, second = _merged(a), _merged(b)
    total, i, j = 0.0, 0, 0
    while i < len(first) and j < len(second):
        start = max(first[i][0], second[j][0])
        end = min(first[i][1], second[j][1])
        if end > start:
            total += end - start
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return total


def _short(filename: str) -> str:
    return os.path.relpath(filename) if os.path.isabs(filename) else filename
