"""A profile as Chrome trace-event JSON (Perfetto and chrome://tracing open it).

Processes: the notebook, then one per agent. Threads (tracks): the notebook's API calls, time
blocked at sync points, NVTX ranges and lease events; per agent the wire and queue, the agent's
execution and one track per GPU stream. Every span is a complete (``X``) event, API calls are
instants (``i``); names come as ``M`` metadata. Times are microseconds since the profile began.
A harp tensor operator is named by its aten operator ("aten::mm") on every track.
"""

from __future__ import annotations

from typing import Any

from harp_jupyter.profiler.profile import Profile
from harp_jupyter.profiler.recorder import TORCH_OPERATOR_CALLS

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
    kernel_names = _kernel_names_by_call(profile)
    sites = {(b.agent, b.seq): b.sites for b in rec.batches}
    for call in rec.calls:
        if call.at > t_end:
            continue  # the profiler's own clock samples
        args: dict[str, Any] = {"at": at(call.site)}
        if call.bytes_up:
            args["bytes_up"] = call.bytes_up
        if call.bytes_down:
            args["bytes_down"] = call.bytes_down
        if call.detail:
            args["kernel"] = call.detail
        events.append({"name": named(call.op, call.detail), "cat": "api", "ph": "i", "s": "t",
                       "ts": us(call.at),
                       "pid": NOTEBOOK_PID, "tid": API_TID, "args": args})
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
            for index, start, end in times.get("calls") or ():
                if 0 <= index < len(batch.ops):
                    detail = batch.details[index] if index < len(batch.details) else ""
                    span(n, EXEC_TID, named(batch.ops[index], detail), to_nb(start),
                         to_nb(end), "agent",
                         at=at(batch.sites[index]), batch=batch.seq)
        streams: dict[Any, int] = {}
        for op, stream, start, end, seq, index in rec.gpu.get(endpoint, ()):
            if stream not in streams:
                streams[stream] = GPU_TID_BASE + len(streams)
                label = "default stream" if stream is None else f"stream {stream}"
                meta(n, streams[stream], "thread_name",
                     f"{'emulated device (host NumPy time)' if info.emulated else 'GPU'}, "
                     f"{label}")
            name = kernel_names.get((endpoint, seq, index)) or op
            span(n, streams[stream], name, to_nb(start), to_nb(end), "gpu", op=op,
                 at=_site(sites.get((endpoint, seq)), index, at))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "harp_jupyter %%harp profile", "label": profile.label,
                          "clock": {e: {"offset_ns": i.offset.offset_ns,
                                        "error_ns": i.offset.error_ns,
                                        "samples": i.offset.samples}
                                    for e, i in profile.agents.items() if i.offset},
                          "note": profile.recorder.gpu_timing_note}}


def _kernel_names_by_call(profile: Profile) -> dict[tuple[str, int, int], str]:
    """(agent, batch seq, call index) -> kernel name, for the GPU spans of launches."""
    return {(batch.agent, batch.seq, index): detail for batch in profile.recorder.batches
            for index, detail in enumerate(batch.details) if detail}


def _site(sites: list[Any] | None, index: int, at: Any) -> str:
    return at(sites[index]) if sites is not None and 0 <= index < len(sites) else ""
