"""Bad input to a real agent: each gets an error reply, and the agent keeps serving others."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_agent import protocol as P
from tests.agent_client import RawClient, result_bytes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def clients(module_emulated_agent: Any) -> Iterator[tuple[RawClient, RawClient]]:
    bad, good = RawClient(module_emulated_agent.endpoint), RawClient(module_emulated_agent.endpoint)
    try:
        yield bad, good
    finally:
        bad.close()
        good.close()


def good_client_still_served(good: RawClient) -> None:
    welcome = good.welcome or good.hello()
    base = welcome["range"][0]
    reply, frames = good.batch(["alloc", base, P.GRANULARITY], ["htod", base, b"harp", None],
                               ["dtoh", base, 4, None], ["free", base])
    assert reply["e"] is None
    assert result_bytes(reply, frames, 2) == b"harp"


@pytest.mark.parametrize("frames", [
    (b"\xc1\xff garbage",),
    (P.pack_header([1, 2, 3]),),
    (P.pack_header({"t": "no-such-message"}),),
    (P.pack_header({"no": "type"}),),
])
def test_garbage_gets_an_error_reply(clients: tuple[RawClient, RawClient],
                                     frames: tuple[bytes, ...]) -> None:
    bad, good = clients
    reply = bad.send_raw(*frames)
    assert reply["t"] == P.ERROR and reply["e"]["kind"] == "ProtocolError"
    good_client_still_served(good)


def test_a_liveness_probe_to_the_worker_is_answered_and_the_session_goes_on(
        clients: tuple[RawClient, RawClient]) -> None:
    """The shim probes its worker with STATUS when a batch (a long compile) stays unanswered
    past HARP_AGENT_TIMEOUT; an error reply to it was read as the answer to the next call."""
    _, good = clients
    good.hello()
    assert good.data is not None
    good.data.send(P.pack_header({"t": P.STATUS}))
    reply, _ = P.decode(good.data.recv_multipart())
    assert reply == {"t": P.STATUS}
    good_client_still_served(good)


def test_wrong_protocol_version_and_batch_before_hello(
        clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    reply, _ = bad.request({"t": P.HELLO, "v": 999})
    assert reply["e"]["kind"] == "VersionMismatch" and "version" in reply["e"]["msg"]
    reply, _ = bad.batch(["synchronize"])
    assert reply["e"]["kind"] == "SessionError"
    good_client_still_served(good)


@pytest.mark.parametrize(("call", "kind"), [
    (["no_such_op"], "ProtocolError"),
    (["alloc", "not-an-int", 1], "ProtocolError"),
    (["alloc", 1], "ProtocolError"),
    (["dtoh", 0x10, 4, None], "HandleError"),
    (["free", 0x1234], "HandleError"),
    (["alloc", 2**60, 2**60], "HandleError"),
    (["htod", 0, P.FrameRef(5), None], "ProtocolError"),
    (["stream_synchronize", 77], "HandleError"),
    (["array", "add", [0, "<f4", [4], [4]], [1, 2], {}, None], "HandleError"),
    (["launch", 1, [1], [1], 0, None, b""], "NotSupported"),
    (["module_link", 1, [["stdlib", "../../lib/x"]], b"", {}], "ProtocolError"),
    (["module_link", 1, [["data", "PTX", "k", 0, 8]], b"", {}], "NotSupported"),
    (["curand_new", 1, "os.system", {}], "ProtocolError"),
    (["curand_call", 1, "__init__", 0, 8, [], None], "ProtocolError"),
    (["curand_call", 1, "fill_uniform", 0x10, 8, [], None], "HandleError"),
])
def test_bad_calls_get_clear_errors(clients: tuple[RawClient, RawClient], call: list[Any],
                                    kind: str) -> None:
    bad, good = clients
    bad.hello()
    reply, _ = bad.batch(["synchronize"], call, ["ping"])
    assert reply["e"]["kind"] == kind, reply["e"]
    assert reply["e"]["i"] == 1
    assert [index for index, _ in reply["r"]] == [0, 2]  # the rest of the batch still ran
    bad.release()
    good_client_still_served(good)


KERNEL = "__global__ void k(float *x) { x[0] = 1; }"
#: nvcc options that would read or write the agent's files or run programs there
HOSTILE_NVCC = [
    ["--pre-include", "/etc/shadow"], ["-include", "/etc/passwd"], ["-Xcompiler", "-fplugin=x"],
    ["-I/"], ["--output-directory", "/tmp"], ["-ccbin", "/tmp/evil"], ["--keep-dir", "/tmp"],
    ["--linker-options=-T/x"], ["-L/tmp"], ["-lcrypto"], ["--cudart", "shared"],
    ["--compiler-bindir=/tmp"], ["--run"], ["-run"], ["--options-file", "/etc/passwd"],
    ["-o", "/tmp/x"], ["-Xptxas", "--output-file=/tmp/x"],
    ["-DX=$(touch /tmp/harp-pwned)"],  # nvcc's sub-tools run through a shell
]


def _compiles(options: list[str]) -> list[list[Any]]:
    """Every op that compiles CUDA C, carrying ``options`` for nvcc."""
    desc = [0x10, "<f4", [4], [4]]
    return [
        ["module_source", 1, KERNEL, options, False, None, None, []],
        ["module_link", 2, [["source", KERNEL, options, "k.cu"]], b"", {}],
        ["elementwise_new", 3, "float *x", "x[i] = 0", "k", {"options": options}],
        ["reduction_new", 4, "<f4", "0", "a+b", "x[i]", "float *x", {"options": options}],
        ["array", "scan", desc, [desc], {"options": options}, None],
    ]


@pytest.mark.parametrize("options", HOSTILE_NVCC, ids=" ".join)
def test_hostile_nvcc_options_are_refused_before_any_compile(
        clients: tuple[RawClient, RawClient], options: list[str]) -> None:
    """The emulated executor would refuse CUDA C as NotSupported: a ProtocolError naming the
    option shows the call was refused by validation, before any executor saw it."""
    bad, good = clients
    bad.hello()
    for call in _compiles(options):
        reply, _ = bad.batch(call)
        assert reply["e"]["kind"] == "ProtocolError", (call[0], reply["e"])
        assert f"nvcc option {options[0][:2]}" in reply["e"]["msg"].replace("'", "")
        assert "is not allowed" in reply["e"]["msg"]
    bad.release()
    good_client_still_served(good)


@pytest.mark.parametrize("call", [
    ["module_source", 1, KERNEL, [], False, "sm_90 --run", None, []],
    ["module_source", 1, KERNEL, [], False, None, "-I/etc", []],
    ["module_source", 1, KERNEL, [], False, None, None, ["/etc"]],
    ["module_link", 1, [["source", KERNEL, [], "k.cu"]], b"", {"include_dirs": ["/"]}],
    ["module_link", 1, [["source", KERNEL, [], "k.cu"]], b"", {"cache_dir": "/tmp"}],
], ids=["arch", "code", "include_dirs", "link include_dirs", "link cache_dir"])
def test_compile_fields_naming_the_agents_files_are_refused(
        clients: tuple[RawClient, RawClient], call: list[Any]) -> None:
    bad, good = clients
    bad.hello()
    reply, _ = bad.batch(call)
    assert reply["e"]["kind"] == "ProtocolError", reply["e"]
    bad.release()
    good_client_still_served(good)


def test_allowed_nvcc_options_reach_the_executor(clients: tuple[RawClient, RawClient]) -> None:
    """Allowed options pass validation: the emulated executor then refuses CUDA C itself."""
    bad, good = clients
    bad.hello()
    options = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17", "-DN=4", "--maxrregcount=32"]
    for call in _compiles(options)[:3]:
        reply, _ = bad.batch(call)
        assert reply["e"]["kind"] == "NotSupported", (call[0], reply["e"])
    bad.release()
    good_client_still_served(good)


def test_freed_memory_is_refused_and_sessions_cannot_see_each_other(
        clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    base = bad.hello()["range"][0]
    reply, _ = bad.batch(["alloc", base, P.GRANULARITY], ["free", base],
                         ["dtoh", base, 4, None])
    assert reply["e"]["kind"] == "HandleError" and "not inside memory" in reply["e"]["msg"]
    reply, _ = bad.batch(["alloc", base, P.GRANULARITY], ["htod", base, b"mine", None])
    assert reply["e"] is None
    bad.release()  # parks bad's session: its memory leaves the GPU
    other_base = good.hello()["range"][0]
    assert other_base != base
    reply, _ = good.batch(["alloc", other_base, P.GRANULARITY], ["dtoh", base, 4, None])
    assert reply["e"]["kind"] == "HandleError"  # bad's parked memory is not good's to read
    reply, frames = good.batch(["dtoh", other_base, 4, None])
    assert result_bytes(reply, frames) == b"\0\0\0\0"  # scrubbed, never another tenant's


def test_out_of_memory_is_a_memory_error(clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    base = bad.hello()["range"][0]
    reply, _ = bad.batch(["alloc", base, 64 << 30])  # the emulated device has 4 GiB
    assert reply["e"]["kind"] == "MemoryError"
    assert re.search(r"out of memory: 64\.0 GiB requested, \d+\.\d GiB of this GPU slot's "
                     r"4\.0 GiB free", reply["e"]["msg"]), reply["e"]["msg"]
    bad.release()
    good_client_still_served(good)


def test_the_start_up_lines_say_sizes_readably(module_emulated_agent: Any) -> None:
    lines = "".join(module_emulated_agent.output)
    assert re.search(r"harp-agent: 1 slot\(s\) of 4\.0 GiB; parked state up to "
                     r"\d+\.\d [KMGT]iB in host memory, \d+\.\d [KMGT]iB in all\n", lines), lines
    assert not re.search(r"\d{7,}", lines.replace(module_emulated_agent.endpoint, ""))


def test_wrong_token_is_refused(agent_starter: Any) -> None:
    agent = agent_starter("--token", "s3cret")
    client = RawClient(agent.endpoint)
    try:
        reply, _ = client.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "k",
                                   "kernel_secret": "s", "token": "wrong"})
        assert reply["e"]["kind"] == "AuthError" and reply["rid"] == 1
        assert client.hello(token="s3cret")["t"] == P.WELCOME
        assert client.hello(token="wrong")["e"]["kind"] == "AuthError"  # with a held lease too
    finally:
        client.close()


def test_sessions_need_a_held_lease_and_a_valid_token(
        clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    reply, _ = bad.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {}})
    assert reply["e"]["kind"] == "LeaseError" and "lease" in reply["e"]["msg"]
    good.hello()
    assert bad.take_lease(wait=False)["state"] == "queued"  # good holds the GPU
    reply = bad.hello()
    assert reply["e"]["kind"] == "LeaseError" and "queued" in reply["e"]["msg"]
    reply, _ = bad.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {},
                            "lease": [good.lease["id"], "forged"]})
    assert reply["e"]["kind"] == "LeaseError"
    reply, _ = bad.request({"t": P.LEASE_RENEW, "rid": 3, "lease_id": good.lease["id"],
                            "token": "forged"})
    assert reply["e"]["kind"] == "LeaseError"
    reply, _ = bad.request({"t": P.LEASE_REQUEST, "rid": 4, "kernel_id": good.kernel_id,
                            "kernel_secret": "not-good's"})
    assert reply["e"]["kind"] == "LeaseError"  # nobody may pose as another kernel
    reply, _ = bad.request({"t": P.DROP_PARKED, "rid": 5, "kernel_id": good.kernel_id,
                            "kernel_secret": "not-good's"})
    assert reply["e"]["kind"] == "LeaseError"
    reply, _ = bad.request({"t": P.PARKED_FETCH, "rid": 6, "session": "nope",
                            "resume_token": "nope"})
    assert reply["e"]["kind"] == "StateLost"
    good_client_still_served(good)


def test_calls_after_the_lease_ended_do_not_run(clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    base = bad.hello()["range"][0]
    reply, _ = bad.batch(["alloc", base, P.GRANULARITY], ["htod", base, b"kept", None])
    assert reply["e"] is None
    bad.release()  # the agent parks the session: its worker ends under the connection
    notice = bad.next_push(P.LOST)
    assert notice["parked"] is True and notice["e"]["kind"] == "LeaseError"
    assert "parked" in notice["e"]["msg"] and "restores it" in notice["e"]["msg"]
    good_client_still_served(good)


def test_a_session_holds_at_most_its_objects_and_the_refusal_is_its_own(
        agent_starter: Any) -> None:
    """--session-objects bounds the device objects one session may hold (each costs the agent
    host memory and replay log): one more create is a clear error to that session alone, and a
    destroyed object makes room again."""
    agent = agent_starter("--session-objects", "3", "--slots", "2")
    bad, good = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        bad.hello()
        good.hello()
        reply, _ = bad.batch(*(["stream_create", h, 0] for h in (1, 2, 3)))
        assert reply["e"] is None
        reply, _ = bad.batch(["stream_create", 4, 0])
        assert reply["e"]["kind"] == "LogicError" and "--session-objects" in reply["e"]["msg"]
        reply, _ = good.batch(*(["stream_create", h, 0] for h in (1, 2, 3)))
        assert reply["e"] is None  # the other session's count is its own
        reply, _ = bad.batch(["stream_destroy", 2], ["stream_create", 4, 0])
        assert reply["e"] is None
    finally:
        bad.close()
        good.close()


def test_an_oversized_lease_request_is_refused_in_readable_sizes_naming_the_flag(
        clients: tuple[RawClient, RawClient]) -> None:
    """--max-lease-info defaults to 16 KiB: a 20 000-character info map is refused, in KiB (not
    a raw byte count) and naming the flag; so is a user name past --max-secret."""
    bad, good = clients
    reply, _ = bad.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "k",
                            "kernel_secret": "s", "info": {"note": "x" * 20_000}})
    message = reply["e"]["msg"]
    assert reply["e"]["kind"] == "ProtocolError"
    assert "lease info of 19.5 KiB" in message and "at most 16.0 KiB" in message, message
    assert "harp-agent --max-lease-info" in message and not re.search(r"\d{4,}", message)
    reply, _ = bad.request({"t": P.LEASE_REQUEST, "rid": 2, "kernel_id": "k",
                            "kernel_secret": "s", "user": "u" * 300})
    assert "harp-agent --max-secret" in reply["e"]["msg"], reply
    good_client_still_served(good)
