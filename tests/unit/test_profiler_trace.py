"""The timeline of a profile (``trace.build``) from a recorder filled by hand: every call, batch
and GPU span at its user's line, times in µs since the profile began as exact as the ns they
come from."""

from __future__ import annotations

import random

from gpu_agent.profiling import BATCH_SPAN
from harp_jupyter.profiler import clock, recorder, trace
from harp_jupyter.profiler.display import ProfileResult
from harp_jupyter.profiler.profile import AgentInfo, Profile
from harp_jupyter.profiler.recorder import BatchTiming, Blocked, Recorder

AGENT = "tcp://gpu:5555"


def profile_of_a_loop(launches: int) -> Profile:
    rec = Recorder()
    recorder.KERNEL_NAMES[7] = "add_one"
    t0 = rec.started
    loop = ("/tmp/ipykernel_1/cell.py", 3, "<module>")
    other = ("/home/me/model.py", 40, "step")
    sites = [loop if i % 3 else other for i in range(launches)]
    for i, site in enumerate(sites):
        rec.note_call(["launch", 7, (1, 1, 1), (32, 1, 1), 0, None, b""], site, 8)
        # the call at a known time: the recorder's own clock runs as the test does
        last = rec.calls[-1]
        last.last = t0 + 1000 * i + 7
        if last.count == 1:
            last.at = last.last
    rec.blocked.append(Blocked(t0 + 1000 * launches, t0 + 1000 * launches + 123_456,
                               "synchronize", loop, "sync"))
    agent_ns = -5_000_000  # the agent's clock reads 5 ms behind the notebook's
    rec.batches.append(BatchTiming(
        1, AGENT, t0 + 10, t0 + 1000 * launches + 50, ["launch"] * launches, sites,
        ["add_one"] * launches,
        {"recv": t0 + 20 + agent_ns, "end": t0 + 900 * launches + agent_ns,
         "calls": [[i, t0 + 30 + 900 * i + agent_ns, t0 + 500 + 900 * i + agent_ns]
                   for i in range(launches)]}))
    rec.gpu[AGENT] = [["launch", None, t0 + 600 + 900 * i + agent_ns,
                       t0 + 1601 + 900 * i + agent_ns, 1, i] for i in range(launches)]
    rec.ended = t0 + 1000 * launches + 200_000
    profile = Profile(rec, line_offsets={"/tmp/ipykernel_1/cell.py": 1})
    profile.agents[AGENT] = AgentInfo(AGENT, False, "H200",
                                      clock.ClockOffset(agent_ns, 10, 3))
    return profile


def test_every_event_names_its_users_line_and_exact_times() -> None:
    launches = 50
    profile = profile_of_a_loop(launches)
    events = trace.build(profile)["traceEvents"]
    by_cat: dict[str, list[dict]] = {}
    for e in events:
        by_cat.setdefault(e.get("cat", "meta"), []).append(e)
    expected_at = ["/home/me/model.py:40" if i % 3 == 0 else "cell:4" for i in range(launches)]
    # calls 3k+1 and 3k+2 come from one line, one after the other: one span "add_one x2"
    runs = [[i] if i % 3 == 0 else [i, i + 1][:launches - i] for i in range(launches)
            if i % 3 != 2]
    api = by_cat["api"]
    assert [e["args"]["at"] for e in api] == [expected_at[run[0]] for run in runs]
    assert [e["ts"] for e in api] == [round((1000 * run[0] + 7) / 1000, 3) for run in runs]
    assert [(e["ph"], e["name"], e.get("dur"), e["args"].get("calls")) for e in api] == [
        ("i", "launch", None, None) if len(run) == 1 else ("X", "launch x2", 1.0, 2)
        for run in runs]
    agent = by_cat["agent"]
    assert [e["args"]["at"] for e in agent] == [expected_at[run[0]] for run in runs]
    assert [(e["name"], e["ts"], e["dur"]) for e in agent] == [
        ("launch" if len(run) == 1 else "launch x2", round((30 + 900 * run[0]) / 1000, 3),
         round((500 + 900 * run[-1] - 30 - 900 * run[0]) / 1000, 3)) for run in runs]
    gpu = by_cat["gpu"]
    assert [e["args"]["at"] for e in gpu] == expected_at
    assert [e["name"] for e in gpu] == ["add_one"] * launches
    assert [(e["ts"], e["dur"]) for e in gpu] == [
        (round((600 + 900 * i) / 1000, 3), 1.001) for i in range(launches)]
    (wait,) = by_cat["sync"]
    assert wait["args"]["at"] == "cell:4" and wait["dur"] == 123.456


def test_ns_over_1000_is_what_rounding_to_3_decimals_gives() -> None:
    # trace.build divides without round(): the same float, for any ns a profile can hold
    rng = random.Random(16)
    for ns in [0, 1, 999, 1000, 123_456_789, 2**53 - 1] + [
            rng.randrange(2**53) for _ in range(20_000)]:
        assert ns / 1000.0 == round(ns / 1000.0, 3), ns


def test_a_gpu_batch_span_says_how_many_kernels_it_holds_and_invents_no_kernel_times() -> None:
    launches = 40
    profile = profile_of_a_loop(launches)
    rec = profile.recorder
    agent_ns = profile.agents[AGENT].offset.offset_ns  # type: ignore[union-attr]
    t0 = rec.started
    # the agent timed the batch's launches as one span; one more record of a shape this
    # notebook does not know (a newer agent's) is left out, and the note says so
    rec.gpu[AGENT] = [[BATCH_SPAN, None, t0 + 600 + agent_ns, t0 + 90_000 + agent_ns, 1, 0,
                       list(range(launches))],
                      ["launch", None, t0, t0, 1, 0, "?", "?"]]
    result = ProfileResult(profile)
    gpu = [e for e in result.trace["traceEvents"] if e.get("cat") == "gpu"]
    assert len(gpu) == 1
    (span,) = gpu
    assert span["name"] == f"add_one x{launches}"
    assert (span["ts"], span["dur"]) == (0.6, 89.4)
    args = span["args"]
    assert args["op"] == BATCH_SPAN and args["ops"] == launches and args["batch"] == 1
    assert args["kernels"] == f"add_one x{launches}"
    assert args["at"] == "/home/me/model.py:40"  # the first launch's line
    assert "were not measured" in args["per_op_times"]
    assert "1 GPU timings from the agent have a shape" in result.trace["otherData"]["note"]
    summary = result.summary
    assert summary["gpu_batched"] == {"spans": 1, "ops": launches}
    assert summary["top_kernels"] == []  # no per-kernel time is made up from the span
    assert f"{launches} GPU ops timed per batch, in 1 spans" in result._text()
    assert "no per-kernel GPU times" in result._text()
    # the advice still names the user's line
    assert result.advice[0]["site"] == "cell:4" and result.advice[0]["op"] == "synchronize"


def test_a_batch_span_of_mixed_ops_is_named_by_its_count() -> None:
    profile = profile_of_a_loop(12)
    batch = profile.recorder.batches[0]
    batch.ops[5], batch.details[5] = "memset", ""
    agent_ns = profile.agents[AGENT].offset.offset_ns  # type: ignore[union-attr]
    t0 = profile.recorder.started
    profile.recorder.gpu[AGENT] = [[BATCH_SPAN, 3, t0 + agent_ns, t0 + 5000 + agent_ns, 1, 0,
                                    list(range(12))]]
    (span,) = [e for e in trace.build(profile)["traceEvents"] if e.get("cat") == "gpu"]
    assert span["name"] == "12 GPU ops"
    assert span["args"]["kernels"] == "add_one x11, memset x1"


def test_gpu_ops_without_a_gpu_time_are_counted_in_the_note() -> None:
    profile = profile_of_a_loop(30)
    profile.recorder.gpu[AGENT] = profile.recorder.gpu[AGENT][:25]  # the agent's bound
    result = ProfileResult(profile)
    assert "5 of the 30 GPU ops sent have no GPU time" in result.summary["note"]
    assert result.summary["note"] in result._text()
