"""A profile as Chrome trace-event JSON (Perfetto and chrome://tracing open it).

Processes: the notebook, then one per agent. Threads (tracks): the notebook's API calls, time
blocked at sync points, NVTX ranges and lease events; per agent the wire and queue, the agent's
execution and one track per GPU stream. Every span is a complete (``X``) event, a lone API call
is an instant (``i``); names come as ``M`` metadata. Times are microseconds since the profile
began. A harp tensor operator is named by its aten operator ("aten::mm") on every track.

A run of consecutive identical calls (same op, kernel and line: a loop of one launch) is one
span named ``add_one x2000`` with its count, on the API track (from the first call to the last)
and on the agent's execution track (within one batch), not one event per call. A GPU batch span
(``gpu_agent.profiling.BATCH_SPAN``) says how many GPU ops it covers and that their own GPU
times were not measured.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from gpu_agent import protocol
from gpu_agent.profiling import BATCH_SPAN
from harp_jupyter.profiler.profile import Profile
from harp_jupyter.profiler.recorder import TORCH_OPERATOR_CALLS

#: ops that put work on the GPU (timed while profiling)
_GPU_OPS = frozenset(name for name, op in protocol.OPS.items() if op.gpu)
NOTEBOOK_PID = 1
API_TID, BLOCKED_TID, NVTX_TID, LEASE_TID = 1, 2, 3, 4
WIRE_TID, EXEC_TID, GPU_TID_BASE = 1, 2, 10
_NOTEBOOK_TRACKS = {API_TID: "API calls", BLOCKED_TID: "blocked at sync points",
                    NVTX_TID: "NVTX ranges", LEASE_TID: "GPU lease"}


def where(site: Any, profile: Profile | None = None) -> str:
    """``file:line`` of a call site, the line as the user's editor numbers it (a notebook
    cell by its name: "cell", "In[3]")."""
    if not site:
        return ""
    if profile is None:
        return f"{site[0]}:{site[1]}"
    return f"{profile.cell_name(site[0]) or site[0]}:{profile.shown_line(site[0], site[1])}"


def named(op: str, detail: str) -> str:
    """A call's name on the timeline: a torch call by the aten operator it ran."""
    return detail if detail and op in TORCH_OPERATOR_CALLS else op


def build(profile: Profile) -> dict[str, Any]:
    rec = profile.recorder
    t0, t_end = profile.started, profile.ended
    events: list[dict[str, Any]] = []
    # a profile of a loop has thousands of events from a few lines: each line is named once
    locations: dict[Any, str] = {}

    def at(site: Any) -> str:
        try:
            return locations[site]
        except KeyError:
            location = locations[site] = where(site, profile)
            return location

    # times are integer ns: ns / 1000 is already the float nearest to the µs with 3 decimals
    # (what round(..., 3) would give), without a round() per event
    def us(ns: int) -> float:
        return (ns - t0) / 1000.0

    def span(pid: int, tid: int, name: str, start: int, end: int, cat: str,
             **args: Any) -> None:
        events.append({"name": name, "cat": cat, "ph": "X", "ts": (start - t0) / 1000.0,
                       "dur": (end - start) / 1000.0 if end > start else 0.0, "pid": pid,
                       "tid": tid, "args": args})

    def meta(pid: int, tid: int | None, kind: str, name: str) -> None:
        event: dict[str, Any] = {"name": kind, "ph": "M", "pid": pid, "args": {"name": name}}
        if tid is not None:
            event["tid"] = tid
        events.append(event)

    meta(NOTEBOOK_PID, None, "process_name", f"notebook ({profile.host}, pid {profile.pid})")
    for tid, name in _NOTEBOOK_TRACKS.items():
        meta(NOTEBOOK_PID, tid, "thread_name", name)
    unknown = 0  # GPU timings of a shape this notebook does not know
    untimed = gpu_sent = 0  # GPU ops sent, and those of them with no GPU timing
    for call in rec.calls:
        if call.at > t_end:
            continue  # the profiler's own clock samples
        op, detail = call.op, call.detail
        args: dict[str, Any] = {"at": at(call.site)}
        if call.bytes_up:
            args["bytes_up"] = call.bytes_up
        if call.bytes_down:
            args["bytes_down"] = call.bytes_down
        if detail:
            args["kernel"] = detail
        if call.count == 1:
            events.append({"name": named(op, detail), "cat": "api", "ph": "i", "s": "t",
                           "ts": us(call.at), "pid": NOTEBOOK_PID, "tid": API_TID,
                           "args": args})
        else:
            span(NOTEBOOK_PID, API_TID, f"{named(op, detail)} x{call.count}", call.at,
                 call.last, "api", calls=call.count, **args)
    for blocked in rec.blocked:
        if blocked.start > t_end:
            continue
        span(NOTEBOOK_PID, BLOCKED_TID, f"wait: {named(blocked.op, blocked.detail)}",
             blocked.start, blocked.end,
             "sync", at=at(blocked.site), why=blocked.why)
    for s in rec.spans:
        tid = NVTX_TID if s.track == "nvtx" else LEASE_TID
        span(NOTEBOOK_PID, tid, s.name, s.start, s.end, s.track,
             **{k: v for k, v in s.args.items() if v is not None})

    for n, (endpoint, info) in enumerate(sorted(profile.agents.items()), start=2):
        kind = "EMULATED device" if info.emulated else (info.gpu or "GPU")
        meta(n, None, "process_name", f"agent {endpoint} ({kind})")
        meta(n, WIRE_TID, "thread_name", "wire + agent queue")
        meta(n, EXEC_TID, "thread_name", "agent execution")
        if info.offset is None:
            continue
        to_nb = info.offset.to_notebook
        for batch in rec.batches:
            times = batch.agent_times
            if batch.agent != endpoint or not times or batch.sent > t_end:
                continue
            received, ended = to_nb(times["recv"]), to_nb(times["end"])
            span(n, WIRE_TID, f"batch {batch.seq} →", batch.sent, max(batch.sent, received),
                 "wire", calls=len(batch.ops))
            span(n, WIRE_TID, f"batch {batch.seq} ←", min(ended, batch.received),
                 batch.received, "wire")
            for first, last, start, end in _runs(batch, times.get("calls") or ()):
                detail = batch.details[first] if first < len(batch.details) else ""
                name = named(batch.ops[first], detail)
                if last == first:
                    span(n, EXEC_TID, name, to_nb(start), to_nb(end), "agent",
                         at=at(batch.sites[first]), batch=batch.seq)
                else:
                    span(n, EXEC_TID, f"{name} x{last - first + 1}", to_nb(start), to_nb(end),
                         "agent", at=at(batch.sites[first]), batch=batch.seq,
                         calls=last - first + 1)
        counts = _gpu_tracks(n, endpoint, info, rec, t_end, span, meta, at)
        unknown, untimed, gpu_sent = (unknown + counts[0], untimed + counts[1],
                                      gpu_sent + counts[2])
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "harp_jupyter %%harp profile", "label": profile.label,
                          "clock": {e: {"offset_ns": i.offset.offset_ns,
                                        "error_ns": i.offset.error_ns,
                                        "samples": i.offset.samples}
                                    for e, i in profile.agents.items() if i.offset},
                          "note": _note(rec.gpu_timing_note, unknown, untimed, gpu_sent)}}


#: what a GPU batch span says of the GPU ops in it
BATCH_SPAN_NOTE = ("one pair of GPU events around these {ops} GPU ops of one batch on this "
                   "stream: from before the first to after the last, gaps between them "
                   "included; their own GPU times were not measured (%%harp profile "
                   "--per-op-gpu-timing times each)")


def _gpu_tracks(n: int, endpoint: str, info: Any, rec: Any, t_end: int, span: Any, meta: Any,
                at: Any) -> tuple[int, int, int]:
    """The agent's GPU timings as one track per stream of process ``n``; (records of a shape
    this notebook does not know, GPU ops sent without a GPU time, GPU ops sent)."""
    to_nb = info.offset.to_notebook
    streams: dict[Any, int] = {}
    batches = {b.seq: b for b in rec.batches if b.agent == endpoint}
    unknown = timed = 0
    for record in rec.gpu.get(endpoint, ()):
        if not _is_gpu_record(record):
            unknown += 1
            continue
        timed += 1 if len(record) == 6 else len(record[6])
        op, stream, start, end, seq, index = record[:6]
        if stream not in streams:
            streams[stream] = GPU_TID_BASE + len(streams)
            label = "default stream" if stream is None else f"stream {stream}"
            meta(n, streams[stream], "thread_name",
                 f"{'emulated device (host NumPy time)' if info.emulated else 'GPU'}, {label}")
        if len(record) == 6:
            batch = batches.get(seq)
            detail = (batch.details[index] if batch is not None
                      and 0 <= index < len(batch.details) else "")
            span(n, streams[stream], detail or op, to_nb(start), to_nb(end), "gpu", op=op,
                 at=_site(batch.sites if batch is not None else None, index, at))
        else:
            name, args = _batch_span(batches.get(seq), record[6], at)
            span(n, streams[stream], name, to_nb(start), to_nb(end), "gpu", op=BATCH_SPAN,
                 batch=seq, **args)
    if endpoint not in rec.gpu:
        return unknown, 0, 0
    sent = sum(1 for b in batches.values() if b.sent <= t_end for op in b.ops if op in _GPU_OPS)
    return unknown, max(0, sent - timed), sent


def _runs(batch: Any, calls: Any) -> Any:
    """(first index, last index, start, end) of each run of consecutive calls of ``batch``
    with the same op, kernel and line, from the agent's ``[[index, start, end], ...]``."""
    keys = list(zip(batch.ops, batch.sites, batch.details, strict=False))
    n_keys = len(keys)
    first = last = start = end = -1
    for index, call_start, call_end in calls:
        if not 0 <= index < n_keys:
            continue
        if index == last + 1 and first >= 0 and keys[index] == keys[first]:
            last, end = index, call_end
            continue
        if first >= 0:
            yield first, last, start, end
        first = last = index
        start, end = call_start, call_end
    if first >= 0:
        yield first, last, start, end


def _is_gpu_record(record: Any) -> bool:
    """``[op, stream, start, end, seq, index]``, or a batch span's with its call indices."""
    return (type(record) is list and len(record) in (6, 7) and type(record[0]) is str
            and (record[1] is None or type(record[1]) is int)
            and all(type(v) is int for v in record[2:6])
            and (len(record) == 6 or (record[0] == BATCH_SPAN and type(record[6]) is list)))


def _batch_span(batch: Any, indices: list[Any], at: Any) -> tuple[str, dict[str, Any]]:
    """A GPU batch span's name and args: the kernels and ops it covers, the first's line."""
    count = len(indices)
    tally: Counter[str] = Counter()
    first_site = None
    if (batch is not None and indices and all(type(i) is int for i in indices)
            and min(indices) >= 0 and max(indices) < len(batch.ops) == len(batch.details)):
        ops, details = batch.ops, batch.details
        tally.update([details[i] or ops[i] for i in indices])
        if indices[0] < len(batch.sites):
            first_site = batch.sites[indices[0]]
    if len(tally) == 1:
        name = f"{next(iter(tally))} x{count}"
    else:
        name = f"{count} GPU ops"
    args: dict[str, Any] = {"ops": count, "per_op_times": BATCH_SPAN_NOTE.format(ops=count)}
    if tally:
        args["kernels"] = ", ".join(f"{k} x{v}" for k, v in tally.most_common())
    if first_site is not None:
        args["at"] = at(first_site)
    return name, args


def _note(note: str, unknown: int, untimed: int, gpu_sent: int) -> str:
    said = [note] if note else []
    if unknown:
        said.append(f"{unknown} GPU timings from the agent have a shape this harp_jupyter does "
                    "not know and are not shown: update harp_jupyter to the agent's version")
    if untimed:
        said.append(f"{untimed} of the {gpu_sent} GPU ops sent have no GPU time: they failed, "
                    "or the agent already held as many GPU timings as it keeps uncollected "
                    "(harp-agent --pending-gpu-timings; profile a shorter cell, or without "
                    "--per-op-gpu-timing)")
    return "; ".join(said)


def _site(sites: list[Any] | None, index: int, at: Any) -> str:
    return at(sites[index]) if sites is not None and 0 <= index < len(sites) else ""
