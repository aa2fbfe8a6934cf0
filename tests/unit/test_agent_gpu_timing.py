"""The agent's GPU timings of profiled batches (gpu_agent/profiling.py), on a real BatchRunner
and emulated executor: a batch of many GPU ops on a stream is one span that lists its ops, a
batch of few is timed op by op, ``p: 2`` times every op, and a span counts only the ops that ran.
"""

from __future__ import annotations

from typing import Any

from gpu_agent import profiling
from gpu_agent import protocol as P
from gpu_agent.batches import BatchRunner
from gpu_agent.executors.emulated import EmulatedExecutor, EmulatedSession

BASE = P.ADDRESS_SPACE_BASE
MANY = profiling.PER_OP_UP_TO + 12


def runner(**options: Any) -> BatchRunner:
    executor = EmulatedExecutor()
    run = BatchRunner(executor, executor.open_session(BASE, P.SESSION_RANGE_SIZE), BASE,
                      P.SESSION_RANGE_SIZE, memory_cap=1 << 30, max_frame=1 << 20, **options)
    run.call("alloc", [BASE, 2 << 20])
    run.call("stream_create", [1, 0])
    return run


def memset(stream: int | None, offset: int = 0) -> list[Any]:
    return ["memset", BASE + offset, 1, 4, 16, stream]


def run_batch(run: BatchRunner, seq: int, calls: list[list[Any]], level: int
              ) -> tuple[dict[str, Any], list[list[Any]]]:
    reply, _ = run.run({"q": seq, "c": calls, "p": level}, [])
    return reply, run.call("profile_gpu", [])


def test_many_gpu_ops_on_a_stream_are_one_span_listing_them_and_few_are_timed_each() -> None:
    run = runner()
    # the default stream gets MANY memsets, stream 1 three, with a synchronize in between
    calls: list[list[Any]] = []
    for i in range(MANY):
        calls.append(memset(None))
        if i in (2, 5, 9):
            calls.append(memset(1))
    calls.insert(4, ["synchronize"])
    reply, timings = run_batch(run, 7, calls, profiling.GPU_PER_BATCH)
    assert reply["e"] is None
    default = [i for i, c in enumerate(calls) if c[0] == "memset" and c[-1] is None]
    on_one = [i for i, c in enumerate(calls) if c[0] == "memset" and c[-1] == 1]
    spans = [t for t in timings if t[0] == profiling.BATCH_SPAN]
    assert len(spans) == 1
    _, stream, start, end, seq, first, indices = spans[0]
    assert (stream, seq, first, indices) == (None, 7, default[0], default)
    assert start <= end
    single = [t for t in timings if t[0] != profiling.BATCH_SPAN]
    assert [(t[0], t[1], t[4], t[5]) for t in single] == [("memset", 1, 7, i) for i in on_one]
    assert all(len(t) == 6 for t in single)
    # the agent still times every call of the batch
    assert [c[0] for c in reply["p"]["calls"]] == list(range(len(calls)))


def test_each_stream_with_many_ops_in_a_batch_gets_its_own_span() -> None:
    run = runner()
    run.call("stream_create", [2, 0])
    calls = [memset([None, 1, 2][i % 3]) for i in range(3 * MANY)]
    calls[4] = memset(1, P.SESSION_RANGE_SIZE)  # refused: not in stream 1's span
    _, timings = run_batch(run, 8, calls, profiling.GPU_PER_BATCH)
    spans = {t[1]: t[6] for t in timings}
    assert all(t[0] == profiling.BATCH_SPAN for t in timings) and len(timings) == 3
    assert spans == {stream: [i for i in range(3 * MANY) if i % 3 == k and i != 4]
                     for k, stream in enumerate([None, 1, 2])}


def test_a_batch_of_few_gpu_ops_is_timed_op_by_op() -> None:
    run = runner()
    calls = [memset(None) for _ in range(profiling.PER_OP_UP_TO)]
    _, timings = run_batch(run, 3, calls, profiling.GPU_PER_BATCH)
    assert [(t[0], t[5]) for t in timings] == [("memset", i) for i in range(len(calls))]
    assert all(len(t) == 6 for t in timings)


def test_per_op_level_times_every_gpu_op_and_agent_timing_none() -> None:
    run = runner()
    calls = [memset(None) for _ in range(MANY)]
    _, timings = run_batch(run, 4, calls, profiling.GPU_PER_OP)
    assert [(t[0], t[5]) for t in timings] == [("memset", i) for i in range(MANY)]
    reply, timings = run_batch(run, 5, calls, profiling.AGENT_TIMING)
    assert timings == [] and len(reply["p"]["calls"]) == MANY


def test_a_span_counts_only_the_ops_that_ran() -> None:
    run = runner()
    outside = P.SESSION_RANGE_SIZE  # an address this session never mapped: the check refuses
    calls = [memset(None) for _ in range(MANY)]
    calls[3] = memset(None, outside)
    calls[-1] = memset(None, outside)  # the span's last op never runs: the reply closes it
    reply, timings = run_batch(run, 9, calls, profiling.GPU_PER_BATCH)
    assert reply["e"] is not None and reply["e"]["i"] == 3
    (span,) = timings
    assert span[0] == profiling.BATCH_SPAN
    assert span[6] == [i for i in range(MANY) if i not in (3, MANY - 1)]


def test_a_span_whose_first_op_never_ran_is_not_timed() -> None:
    run = runner()
    calls = [memset(None) for _ in range(MANY)]
    calls[0] = memset(None, P.SESSION_RANGE_SIZE)
    reply, timings = run_batch(run, 11, calls, profiling.GPU_PER_BATCH)
    assert reply["e"]["i"] == 0
    assert timings == []  # no span that would start at an op that never ran


def test_hostile_calls_do_not_break_the_plan() -> None:
    run = runner()
    junk: list[Any] = [["memset", BASE, 1, 4, 16, [1]], "memset", [], [7], ["memset"],
                       ["memset", BASE, 1, 4, 16, True]]
    calls = junk + [memset(None) for _ in range(MANY)]
    reply, timings = run_batch(run, 12, calls, profiling.GPU_PER_BATCH)
    assert reply["e"] is not None and reply["e"]["i"] == 0
    (span,) = timings
    assert span[6] == list(range(len(junk), len(calls)))


def test_uncollected_gpu_timings_are_bounded() -> None:
    """A client that profiles and never collects cannot make the agent keep timings (and, on a
    GPU, CUDA events) without bound: past the bound GPU ops are not timed; collecting frees it."""
    run = runner(pending_gpu_timings=5)
    calls = [memset(None) for _ in range(MANY)]
    for seq in (20, 21):
        reply, _ = run.run({"q": seq, "c": calls, "p": profiling.GPU_PER_OP}, [])
        assert reply["e"] is None  # the ops themselves still run
    timings = run.call("profile_gpu", [])
    assert [(t[4], t[5]) for t in timings] == [(20, i) for i in range(5)]
    # a batch span needs one record: taken while there is room, none past the bound
    _, timings = run_batch(run, 22, calls, profiling.GPU_PER_BATCH)
    assert [t[0] for t in timings] == [profiling.BATCH_SPAN]


def test_a_span_closed_after_its_stream_is_gone_is_dropped_not_an_error() -> None:
    class StreamCheckingSession(EmulatedSession):
        """Records the end of a timer on its stream, as pycuda's CUDA event does (the emulated
        device itself does not look at the stream)."""

        def gpu_timer_end(self, token: Any, seq: int, index: int,
                          span: list[int] | None = None) -> None:
            if token[1] is not None:
                self._stream(token[1])
            super().gpu_timer_end(token, seq, index, span)

    executor = EmulatedExecutor()
    run = BatchRunner(executor, StreamCheckingSession(executor), BASE, P.SESSION_RANGE_SIZE,
                      memory_cap=1 << 30, max_frame=1 << 20)
    run.call("alloc", [BASE, 2 << 20])
    run.call("stream_create", [1, 0])
    calls = [memset(1) for _ in range(MANY)]
    calls[-1] = memset(1, P.SESSION_RANGE_SIZE)  # refused: the reply closes the span...
    calls.append(["stream_destroy", 1])  # ...after its stream is gone
    reply, timings = run_batch(run, 13, calls, profiling.GPU_PER_BATCH)
    assert reply["e"]["i"] == MANY - 1 and "p" in reply
    assert timings == []  # untimed, and the batch's reply is whole
