"""``%%harp profile`` against a real emulated agent: the timeline's tracks, the sync-point
advisor, the exported Chrome trace's format, spans that line up under a skewed agent clock, and
the magic in an IPython shell."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gpu_agent.profiling import BATCH_SPAN, GPU_PER_BATCH, GPU_PER_OP, PER_OP_UP_TO
from harp_jupyter.profiler.display import MIME_TYPE, ProfileResult
from harp_jupyter.profiler.profile import profiled

nvtx = pytest.importorskip("nvtx")

WORKLOAD = '''
import numpy as np
import nvtx
import pycuda.driver as cuda
import pycuda.gpuarray as ga


def two_streams():
    s1, s2 = cuda.Stream(), cuda.Stream()
    device = cuda.mem_alloc(1 << 16)
    host = np.ones(1 << 14, np.float32)
    with nvtx.annotate("copies"):
        cuda.memcpy_htod_async(device, host, s1)
        s1.synchronize()
        cuda.memcpy_dtoh_async(host, device, s2)
        s2.synchronize()
    return float(host.sum())


def launch_loop(x, stream, n, one_batch):
    with one_batch:
        for i in range(n):
            cuda.memset_d32_async(x, i, 256)  # the loop's launch
            if i in (1, 2, 3):
                cuda.memset_d32_async(x, i, 256, stream)  # a few on another stream
    cuda.Context.synchronize()  # the loop's sync point


def get_in_a_loop(a, n):
    total = 0.0
    nvtx.push_range("loop")
    for _ in range(n):
        total += float((a * 2).get().sum())  # the line the advisor must name
    nvtx.pop_range()
    return total
'''


@pytest.fixture
def load_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[Callable[[], ModuleType]]:
    """The user's code, in a real file, so call sites and source lines are real; imported
    (with the shim's pycuda) when the test calls the loader."""
    (tmp_path / "harp_profile_workload.py").write_text(WORKLOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield lambda: importlib.import_module("harp_profile_workload")
    sys.modules.pop("harp_profile_workload", None)


def loop_line(marker: str = "the line the advisor must name") -> int:
    return next(i for i, line in enumerate(WORKLOAD.splitlines(), start=1) if marker in line)


def validate_trace(trace: dict[str, Any]) -> None:
    """The trace-event format as chrome://tracing and Perfetto read it."""
    json.dumps(trace)  # serialisable as is
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    named_processes = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    named_threads = {(e["pid"], e["tid"]) for e in events
                     if e["ph"] == "M" and e["name"] == "thread_name"}
    stack: dict[tuple[int, int], int] = {}
    for e in events:
        assert {"name", "ph", "pid"} <= set(e), e
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and e["args"]["name"]
            continue
        assert e["ph"] in ("X", "i", "B", "E"), e
        assert isinstance(e["ts"], int | float) and isinstance(e["tid"], int)
        assert e["pid"] in named_processes and (e["pid"], e["tid"]) in named_threads, e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        elif e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
        elif e["ph"] == "B":
            stack[(e["pid"], e["tid"])] = stack.get((e["pid"], e["tid"]), 0) + 1
        else:
            stack[(e["pid"], e["tid"])] -= 1
    assert all(depth == 0 for depth in stack.values()), "unmatched B/E events"


def tracks(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Thread name -> its span and instant events."""
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    for e in trace["traceEvents"]:
        if e["ph"] != "M":
            found[names[(e["pid"], e["tid"])]].append(e)
    return found


def test_a_cell_with_nvtx_two_streams_and_a_sync_point_gives_every_track(
        shim_cuda: ModuleType, load_workload: Callable[[], ModuleType],
        tmp_path: Path) -> None:
    import numpy as np
    import pycuda.gpuarray as ga

    workload = load_workload()
    a = ga.to_gpu(np.arange(1000, dtype=np.float32))

    def cell() -> float:
        return workload.two_streams() + workload.get_in_a_loop(a, 12)

    value, profile = profiled(cell)
    assert value == (1 << 14) + 12 * 999000.0
    result = ProfileResult(profile)
    validate_trace(result.trace)
    found = tracks(result.trace)
    for track in ("API calls", "blocked at sync points", "NVTX ranges", "wire + agent queue",
                  "agent execution"):
        assert found.get(track), f"no {track!r} track: {sorted(found)}"
    gpu_tracks = [t for t in found if t.startswith("emulated device")]
    assert {"emulated device (host NumPy time), stream 1",
            "emulated device (host NumPy time), stream 2"} <= set(gpu_tracks), gpu_tracks
    assert {e["name"] for e in found["NVTX ranges"]} == {"copies", "loop"}
    # ...and were opened in the agent's process too, in order with the GPU work
    sent = [op for b in profile.recorder.batches for op in b.ops if op.startswith("nvtx_")]
    assert sent == ["nvtx_push", "nvtx_pop", "nvtx_push", "nvtx_pop"]
    assert any(e["name"] == "multiply" for t in gpu_tracks for e in found[t])

    top = next(a for a in result.advice if a["op"] == "dtoh")
    assert top["site"].endswith(f"harp_profile_workload.py:{loop_line()}")
    assert top["op"] == "dtoh" and top["count"] == 12
    assert "(a * 2).get().sum()" in top["code"] and ".get() once" in top["advice"]
    syncs = {a["code"] for a in result.advice if a["op"] == "stream_synchronize"}
    assert syncs == {"s1.synchronize()", "s2.synchronize()"}

    summary = result.summary
    assert summary["emulated"] is True and summary["sync_points"] >= 14
    assert summary["bytes_down"] == 12 * 4000 + (1 << 16)
    assert summary["bytes_up"] >= 1 << 16
    assert 0 < summary["gpu_busy_s"] <= summary["wall_s"]
    assert summary["top_kernels"][0]["name"] == "multiply"
    assert summary["top_kernels"][0]["count"] == 12

    bundle = result._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/html", "text/plain"}
    assert "harp_profile_workload.py" in bundle["text/plain"]
    assert "<svg" in bundle["text/html"] and "<table>" in bundle["text/html"]
    json.dumps(bundle[MIME_TYPE])

    exported = tmp_path / "trace.json"
    result.export(str(exported))
    validate_trace(json.loads(exported.read_text()))


def test_agent_spans_line_up_when_the_agent_clock_is_skewed(
        agent_starter: Any, shim_at: Any, monkeypatch: pytest.MonkeyPatch,
        load_workload: Callable[[], ModuleType]) -> None:
    monkeypatch.setenv("HARP_AGENT_CLOCK_SKEW_S", "-3600.5")
    agent = agent_starter()
    with shim_at(agent.endpoint):
        import numpy as np
        import pycuda.gpuarray as ga

        workload = load_workload()
        a = ga.to_gpu(np.arange(1000, dtype=np.float32))
        _, profile = profiled(lambda: workload.get_in_a_loop(a, 20))
    offset = profile.agents[agent.endpoint].offset
    assert offset is not None and offset.samples >= 20
    assert abs(offset.offset_ns / 1e9 - -3600.5) < 0.5, offset  # the skew, found
    # every agent span of a batch lies between that batch's send and its reply, on our clock
    for batch in profile.recorder.batches:
        times = batch.agent_times
        assert times is not None
        for _, start, end in times["calls"]:
            placed_start, placed_end = (offset.to_notebook(start), offset.to_notebook(end))
            slack = offset.error_ns
            assert batch.sent - slack <= placed_start <= placed_end <= batch.received + slack


def test_the_magic_shows_the_profile_and_exports_it(
        shim_cuda: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shown: list[Any] = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)  # type: ignore[method-assign]
    shell.run_line_magic("load_ext", "harp_jupyter.magics")
    exported = tmp_path / "cell.json"
    outcome = shell.run_cell(textwrap.dedent(f"""\
        %%harp profile --export {exported}
        import numpy as np, pycuda.gpuarray as ga
        b = ga.to_gpu(np.arange(10, dtype=np.float64))
        for _ in range(3):
            s = b.get().sum()
        """))
    assert outcome.success, outcome.error_in_exec
    assert shell.user_ns["s"] == 45.0  # the cell really ran, in the user's namespace
    result = shell.user_ns["_harp_profile"]
    assert any(MIME_TYPE in data for data in shown)
    validate_trace(json.loads(exported.read_text()))
    loop = [a for a in result.advice if a["op"] == "dtoh"]
    assert loop and loop[0]["count"] == 3 and loop[0]["code"] == "s = b.get().sum()"
    assert loop[0]["site"] == "cell:5"  # as the editor numbers it: the %%harp line is 1

    # code an earlier cell defined is named by that cell, as IPython's tracebacks name it,
    # never by the kernel's file name for it
    assert shell.run_cell("def total(v):\n    return v.get().sum()\n", store_history=True).success
    defined = shell.execution_count - 1
    outcome = shell.run_cell("%%harp profile\nfor _ in range(2):\n    s = total(b)\n")
    assert outcome.success, outcome.error_in_exec
    result = shell.user_ns["_harp_profile"]
    assert [a["site"] for a in result.advice if a["op"] == "dtoh"] == [f"In[{defined}]:2"]
    at = {e["args"]["at"] for e in result.trace["traceEvents"] if e.get("args", {}).get("at")}
    assert f"In[{defined}]:2" in at and not any("ipython-input" in a for a in at), at

    outcome = shell.run_cell("%harp profile --no-gpu-timing s2 = b.get().sum()")
    assert outcome.success and shell.user_ns["s2"] == 45.0
    assert shell.user_ns["_harp_profile"].profile.recorder.gpu == {}
    with pytest.raises(ValueError, match="unknown option"):
        shell.run_line_magic("harp", "profile --bogus x = 1")
    assert result.profile.recorder.level == GPU_PER_BATCH  # the default
    outcome = shell.run_cell("%harp profile --per-op-gpu-timing s3 = b.get().sum()")
    assert outcome.success and shell.user_ns["s3"] == 45.0
    assert shell.user_ns["_harp_profile"].profile.recorder.level == GPU_PER_OP
    with pytest.raises(ValueError, match="use one of them"):
        shell.run_line_magic("harp", "profile --no-gpu-timing --per-op-gpu-timing x = 1")


@pytest.mark.parametrize("per_op", [False, True])
def test_a_launch_loop_is_one_gpu_span_per_batch_and_stream_unless_per_op_is_asked(
        shim_cuda: ModuleType, load_workload: Callable[[], ModuleType], per_op: bool) -> None:
    from harp_jupyter.shim.session import get_session

    cuda = shim_cuda
    workload = load_workload()
    launches = 5 * PER_OP_UP_TO
    x, stream = cuda.mem_alloc(4 * 256), cuda.Stream()
    cuda.Context.synchronize()
    writer = get_session().current_writer()
    assert writer is not None
    # the writer's lock held around the loop, and its linger long: the calls go in one batch
    # whatever the load (a call queued past the linger would send the batch so far)
    @contextmanager
    def one_batch() -> Iterator[None]:
        with writer.lock:
            linger, writer._linger.linger = writer._linger.linger, 3600.0
            try:
                yield
            finally:
                writer._linger.linger = linger

    _, profile = profiled(lambda: workload.launch_loop(x, stream, launches, one_batch()),
                          per_op=per_op)
    result = ProfileResult(profile)
    validate_trace(result.trace)
    gpu = [e for e in result.trace["traceEvents"] if e.get("cat") == "gpu"]
    memsets = [(b.seq, i) for b in profile.recorder.batches for i, op in enumerate(b.ops)
               if op == "memset"]
    assert len(memsets) == launches + 3 and len({seq for seq, _ in memsets}) == 1
    launch_line, sync_line = loop_line("the loop's launch"), loop_line("the loop's sync point")
    loop_at = f"harp_profile_workload.py:{launch_line}"
    other_at = f"harp_profile_workload.py:{loop_line('a few on another stream')}"
    if per_op:
        assert len(gpu) == launches + 3
        assert all(e["args"]["op"] == "memset" for e in gpu)
        assert result.summary["gpu_batched"] == {"spans": 0, "ops": 0}
    else:
        spans = [e for e in gpu if e["args"]["op"] == BATCH_SPAN]
        assert len(spans) == 1  # the default stream's launches: one span, not one per launch
        (span,) = spans
        assert span["name"] == f"memset x{launches}" and span["args"]["ops"] == launches
        assert span["args"]["at"].endswith(loop_at)
        assert "were not measured" in span["args"]["per_op_times"]
        few = [e for e in gpu if e["args"]["op"] != BATCH_SPAN]
        assert len(few) == 3 and all(e["args"]["at"].endswith(other_at) for e in few)
        assert len({e["tid"] for e in few}) == 1 and few[0]["tid"] != span["tid"]
        assert result.summary["gpu_batched"] == {"spans": 1, "ops": launches}
        assert f"{launches} GPU ops timed per batch" in result._text()
    assert result.summary["note"] == ""  # every GPU op has its GPU time, alone or in a span
    # the loop's calls are one run on the API and agent tracks, at the loop's line
    api = [e for e in result.trace["traceEvents"] if e.get("cat") == "api"
           and e["args"]["at"].endswith(loop_at)]
    assert sum(e["args"].get("calls", 1) for e in api) == launches
    assert result.summary["calls"] >= launches + 3
    sync = next(a for a in result.advice if a["op"] == "synchronize")
    assert sync["site"].endswith(f"harp_profile_workload.py:{sync_line}")
