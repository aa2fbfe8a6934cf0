"""A profile in the notebook: ``application/vnd.harp.timeline+json`` for the lab's renderer, with
``text/html`` (a static timeline, the summary, the advice) and ``text/plain`` fallbacks, so
nbconvert and other front ends show something useful and the saved notebook keeps it."""

from __future__ import annotations

import html
import json
from typing import Any

from gpu_agent.sizes import format_bytes
from harp_jupyter.profiler import advisor, trace
from harp_jupyter.profiler.profile import Profile

MIME_TYPE = "application/vnd.harp.timeline+json"
_HTML_SPANS = 3000  # the static fallback draws at most this many spans
_COLORS = {"api": "#7f8c8d", "sync": "#e74c3c", "nvtx": "#8e44ad", "lease": "#f39c12",
           "wire": "#3498db", "agent": "#16a085", "gpu": "#27ae60"}


def batched_line(ops: int, spans: int) -> str:
    """What the summary says of GPU ops timed per batch (gpu_agent/profiling.py)."""
    return (f"{ops} GPU ops timed per batch, in {spans} spans (one per batch and stream): no "
            "per-kernel GPU times for them, and the busy time counts any gaps between them; "
            "%%harp profile --per-op-gpu-timing times each (slower for launch-bound cells)")


class ProfileResult:
    """What ``%%harp profile`` shows: rich display plus the data (``.trace``, ``.summary``,
    ``.advice``) for code that wants it."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.trace = trace.build(profile)
        self.summary = advisor.summary(profile, self.trace)
        self.advice = [a.to_json() for a in advisor.advise(profile)]

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "label": self.profile.label, "summary": self.summary,
                "advice": self.advice, "trace": self.trace}

    def for_sidebar(self, max_events: int = 20000) -> dict[str, Any]:
        """``to_json()`` with at most ``max_events`` trace events (the control socket carries
        it to the server; the notebook output keeps the whole trace)."""
        data = self.to_json()
        events = self.trace["traceEvents"]
        if len(events) > max_events:
            data["trace"] = {**self.trace, "traceEvents": events[:max_events]}
            data["truncated"] = len(events) - max_events
        return data

    def export(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.trace, f)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {MIME_TYPE: self.to_json(), "text/html": self._html(),
                "text/plain": self._text()}

    def __repr__(self) -> str:
        return self._text()

    # {{{ fallbacks

    def _summary_lines(self) -> list[str]:
        s = self.summary
        device = "emulated device (host NumPy time)" if s["emulated"] else "GPU"
        lines = [
            f"wall time {s['wall_s'] * 1e3:.1f} ms; {device} busy {s['gpu_busy_s'] * 1e3:.1f} ms"
            f" ({s['gpu_share']:.0%})",
            f"{s['calls']} GPU calls in {s['batches']} batches; {s['sync_points']} sync points "
            f"blocked the notebook {s['blocked_s'] * 1e3:.1f} ms, "
            f"{s['network_wait_s'] * 1e3:.1f} ms of it on the network and in the agent's queue",
            f"bytes to the GPU {format_bytes(s['bytes_up'])}, "
            f"from the GPU {format_bytes(s['bytes_down'])}",
        ]
        if s["top_kernels"]:
            lines.append("top kernels: " + ", ".join(
                f"{k['name']} x{k['count']} {k['gpu_s'] * 1e3:.2f} ms" for k in s["top_kernels"]))
        batched = s.get("gpu_batched") or {}
        if batched.get("spans"):
            lines.append(batched_line(batched["ops"], batched["spans"]))
        if s["note"]:
            lines.append(s["note"])
        return lines

    def _text(self) -> str:
        lines = ["HARP profile" + (f": {self.profile.label}" if self.profile.label else "")]
        lines += ["  " + line for line in self._summary_lines()]
        if self.advice:
            lines.append("Sync points (where the notebook waited for the GPU):")
            for a in self.advice:
                lines.append(f"  {a['site']}  {a['code']}")
                lines.append(f"    {a['count']}x {a['op']}, {a['total_s'] * 1e3:.2f} ms: "
                             f"{a['advice']}")
        return "\n".join(lines)

    def _html(self) -> str:
        summary = "".join(f"<li>{html.escape(line)}</li>" for line in self._summary_lines())
        advice = "".join(
            f"<tr><td><code>{html.escape(a['site'])}</code></td>"
            f"<td><code>{html.escape(a['code'])}</code></td><td>{a['count']}x "
            f"{html.escape(a['op'])}</td><td>{a['total_s'] * 1e3:.2f} ms</td>"
            f"<td>{html.escape(a['advice'])}</td></tr>" for a in self.advice)
        table = (f"<table><tr><th>line</th><th>code</th><th>waits</th><th>time</th>"
                 f"<th>what to do</th></tr>{advice}</table>" if advice else "")
        return (f"<div class='harp-profile'><b>HARP profile</b><ul>{summary}</ul>"
                f"{self._svg()}{table}</div>")

    def _svg(self) -> str:
        events = self.trace["traceEvents"]
        names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
                 if e["ph"] == "M" and e["name"] == "thread_name"}
        spans = [e for e in events if e["ph"] == "X"][:_HTML_SPANS]
        tracks = sorted({(e["pid"], e["tid"]) for e in spans})
        if not tracks:
            return ""
        # from the first span, not the cell's start (imports and CPU work come before)
        start = min(e["ts"] for e in spans)
        end = max(e["ts"] + e["dur"] for e in spans)
        width, row, label = 900, 18, 220
        scale = (width - label) / max(end - start, 1.0)
        rows = []
        for i, key in enumerate(tracks):
            y = i * row
            rows.append(f"<text x='0' y='{y + 13}' font-size='11'>"
                        f"{html.escape(str(names.get(key, key)))}</text>")
        index = {key: i for i, key in enumerate(tracks)}
        for e in spans:
            y = index[(e["pid"], e["tid"])] * row + 2
            x = label + (e["ts"] - start) * scale
            w = max(e["dur"] * scale, 0.5)
            rows.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{row - 4}' "
                        f"fill='{_COLORS.get(e.get('cat', ''), '#999')}'>"
                        f"<title>{html.escape(e['name'])} {e['dur']:.1f} µs</title></rect>")
        return (f"<svg width='{width}' height='{len(tracks) * row}' "
                f"xmlns='http://www.w3.org/2000/svg'>{''.join(rows)}</svg>")

    # }}}
