"""Every bound a client can cross with harp tensors, against the real emulated executor session
(CPU torch) and the protocol's validators: a clear error each, nothing run."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from gpu_agent import protocol as P  # noqa: E402
from gpu_agent.errors import AgentError  # noqa: E402
from gpu_agent.executors import torch_ops  # noqa: E402
from gpu_agent.executors.emulated import EmulatedExecutor  # noqa: E402

EMPTY = "aten::empty.memory_format"


def digest(op: Any) -> str:
    return torch_ops.schema_hash(str(op._schema))


def session(memory: int = 1 << 20) -> Any:
    return EmulatedExecutor(memory).open_session(P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)


def empty(s: Any, handle: int, shape: list[int]) -> None:
    s.op_torch_op([handle], EMPTY, digest(torch.ops.aten.empty.memory_format),
                  [[shape], {"dtype": {"d": "float32"}, "device": {"v": 0}}])


def test_argument_trees_deeper_or_larger_than_the_bounds_are_refused() -> None:
    deep: Any = 1
    for _ in range(P.MAX_TORCH_TREE_DEPTH + 1):
        deep = [deep]
    assert "deeper" in P.torch_tree_problem([[deep], {}])
    wide = [[list(range(P.MAX_TORCH_TREE_NODES + 1))], {}]
    assert "more than" in P.torch_tree_problem(wide)
    assert "longer" in P.torch_tree_problem([["x" * (P.MAX_TORCH_STRING + 1)], {}])
    assert P.torch_tree_problem([[{"t": 1, "d": "float32"}], {}]) is not None
    assert P.torch_tree_problem([[{"d": "object"}], {}]) is not None
    inline = {"c": ["float32", [1], b"x" * (P.MAX_INLINE_BYTES + 1)]}
    assert P.torch_tree_problem([[inline], {}]) is not None
    with pytest.raises(P.ProtocolError, match="torch_op: argument 0"):
        P.validate_call(["torch_op", [None] * (P.MAX_TORCH_OUTPUTS + 1), EMPTY, "", [[], {}]])
    assert P.validate_call(["torch_op", [1], EMPTY, "x", [[[2]], {"dtype": {"d": "int64"}}]])


def test_tensor_bytes_beyond_the_device_memory_are_refused() -> None:
    s = session(1 << 20)
    empty(s, 1, [1 << 17])  # 512 KiB
    with pytest.raises(AgentError) as refused:
        empty(s, 2, [1 << 18])
    assert refused.value.kind == "MemoryError" and "out of memory" in str(refused.value)
    assert s.op_torch_info()["tensors"] == 1
    s.op_torch_free([1])
    empty(s, 2, [1 << 17])  # the freed bytes are free again


def test_more_tensors_than_the_session_may_hold_are_refused(monkeypatch: Any) -> None:
    monkeypatch.setattr(torch_ops, "MAX_TENSORS", 3)
    s = session()
    for handle in (1, 2, 3):
        empty(s, handle, [2])
    with pytest.raises(AgentError, match="more than 3 live tensors"):
        empty(s, 4, [2])


def test_operators_outside_the_allow_list_or_with_another_schema_are_refused() -> None:
    s = session()
    with pytest.raises(AgentError, match="not an operator this agent runs") as refused:
        s.op_torch_op([1], "aten::from_file", "0", [["/etc/passwd"], {}])
    assert refused.value.kind == "NotSupported"
    with pytest.raises(AgentError, match="not an operator"):
        s.op_torch_op([1], "os::system", "0", [["true"], {}])
    with pytest.raises(AgentError, match="another schema") as mismatch:
        s.op_torch_op([1], EMPTY, "0123456789abcdef", [[[2]], {}])
    assert mismatch.value.kind == "VersionMismatch"


def test_unknown_handles_and_bad_copies_are_clear_errors() -> None:
    s = session()
    with pytest.raises(AgentError, match="unknown tensor handle 7") as unknown:
        s.op_torch_download(7, 0, 4)
    assert unknown.value.kind == "HandleError"
    empty(s, 1, [4])
    with pytest.raises(AgentError, match="bytes"):
        s.op_torch_write(1, 12, memoryview(b"12345678"))
    with pytest.raises(AgentError, match="already in use"):
        empty(s, 1, [4])


def test_park_objects_round_trip_keeps_views_and_rng() -> None:
    s = session()
    empty(s, 1, [6])
    s.op_torch_op([None], "aten::fill_.Scalar", digest(torch.ops.aten.fill_.Scalar),
                  [[{"t": 1}, 3.0], {}])
    s.op_torch_op([2], "aten::slice.Tensor", digest(torch.ops.aten.slice.Tensor),
                  [[{"t": 1}, 0, 2, 5], {}])
    s.op_torch_seed(11)
    payloads = [memoryview(bytearray(memoryview(p).cast("B"))) for _, p in s.park_objects()]
    expected = torch.randn(3)
    restored = session()
    restored.restore_objects(payloads)
    restored.op_torch_op([None], "aten::zero_", digest(torch.ops.aten.zero_.default),
                         [[{"t": 2}], {}])
    base = torch.frombuffer(bytearray(restored.op_torch_download(1, 0, 24)), dtype=torch.float32)
    assert base.tolist() == [3.0, 3.0, 0.0, 0.0, 0.0, 3.0]
    torch.manual_seed(11)
    torch.testing.assert_close(torch.randn(3), expected)
    with pytest.raises(AgentError, match="damaged"):
        session().restore_objects([memoryview(b"\xc1")])


def test_outputs_of_failed_operators_are_freed_once_and_named_when_used() -> None:
    """The client made an output when it queued the operator and frees it when it dies; the
    agent refused the operator (for memory here), so it keeps the handle as failed: the free is
    taken once, a use says which operator failed, a second free is an error."""
    s = session(1 << 20)
    empty(s, 1, [4])
    with pytest.raises(AgentError, match="out of memory"):
        empty(s, 2, [1 << 18])
    with pytest.raises(AgentError, match=r"handle 2 was never made.*aten::empty") as used:
        s.op_torch_download(2, 0, 4)
    assert used.value.kind == "HandleError"
    s.op_torch_free([2])
    with pytest.raises(AgentError, match="unknown tensor handle 2"):
        s.op_torch_free([2])
    # a sync operator's outputs are made from its reply: a failed one leaves nothing to free
    with pytest.raises(AgentError, match="another schema"):
        s.op_torch_op_sync([3], EMPTY, "0123456789abcdef", [[[2]], {}])
    with pytest.raises(AgentError, match="unknown tensor handle 3"):
        s.op_torch_free([3])


def test_a_free_of_unknown_handles_frees_the_others_then_refuses() -> None:
    s = session()
    empty(s, 1, [4])
    empty(s, 2, [4])
    with pytest.raises(AgentError, match=r"unknown tensor handles 98, 99 \(") as refused:
        s.op_torch_free([1, 98, None, 2, 99])
    assert refused.value.kind == "HandleError"
    assert s.op_torch_info()["tensors"] == 0 and s.op_torch_info()["bytes"] == 0


def test_one_handle_twice_among_an_operators_outputs_is_refused() -> None:
    s = session()
    empty(s, 1, [2, 3])
    booked = s.op_torch_info()["bytes"]
    with pytest.raises(AgentError, match="handle 5 is already in use"):
        s.op_torch_op([5, 5], "aten::max.dim", digest(torch.ops.aten.max.dim),
                      [[{"t": 1}, 1], {}])
    assert (s.op_torch_info()["tensors"], s.op_torch_info()["bytes"]) == (1, booked)
    s.op_torch_free([5])  # kept as a failed operator's output, as the client will free it
    s.op_torch_free([1])
    assert s.op_torch_info()["bytes"] == 0


def test_failed_outputs_survive_parking() -> None:
    s = session(1 << 20)
    empty(s, 1, [4])
    with pytest.raises(AgentError, match="out of memory"):
        empty(s, 2, [1 << 18])
    payloads = [memoryview(bytearray(memoryview(p).cast("B"))) for _, p in s.park_objects()]
    restored = session(1 << 20)
    restored.restore_objects(payloads)
    restored.op_torch_free([2, 1])
    assert restored.op_torch_info()["tensors"] == 0


_CUDA_BESIDE_HARP_PROBE = """
import warnings, torch
torch.backends.cuda.is_built = lambda: True      # as CUDA torch on a GPU machine
torch.cuda.is_available = lambda: True
started = []
torch.cuda._lazy_init = lambda: started.append(1)  # CUDA starts without a GPU here
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as at_import:
    import harp_jupyter.torch
with warnings.catch_warnings(record=True) as at_cuda:
    torch.cuda._lazy_init()
    torch.cuda._lazy_init()
print(len(at_import), len(at_cuda), len(started), at_cuda[0].message if at_cuda else "",
      sep="|")
"""


def test_cuda_beside_harp_is_warned_when_cuda_starts_not_wherever_a_gpu_is() -> None:
    """A process that registers harp on a GPU machine and never starts CUDA (the harp tests' and
    ``harp run``'s processes there) was warned about CUDA autograd at registration, in every
    GPU log; the warning comes once, when the process starts CUDA beside harp."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _CUDA_BESIDE_HARP_PROBE], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    at_import, at_cuda, started, message = done.stdout.strip().split("|", 3)
    assert (at_import, at_cuda, started) == ("0", "1", "2")
    assert "device='harp' or device='cuda' in one process" in message
