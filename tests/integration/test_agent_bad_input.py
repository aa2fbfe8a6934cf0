"""Bad input to a real agent: each gets an error reply, and the agent keeps serving others."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from gpu_agent import protocol as P

pytestmark = pytest.mark.timeout(60)


class RawClient:
    """A DEALER speaking the protocol by hand (no shim), to send what the shim never would."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, 10_000)
        self.socket.connect(endpoint)
        self.seq = 0

    def send_raw(self, *frames: bytes) -> dict:
        self.socket.send_multipart(list(frames))
        header, _ = P.decode(self.socket.recv_multipart())
        return header

    def request(self, header: dict, *frames: bytes) -> tuple[dict, list[Any]]:
        self.socket.send_multipart(P.encode(header, frames))
        return P.decode(self.socket.recv_multipart())

    def hello(self, **extra: Any) -> dict:
        return self.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {}, **extra})[0]

    def batch(self, *calls: list[Any], frames: tuple[bytes, ...] = ()) -> tuple[dict, list[Any]]:
        self.seq += 1
        return self.request({"t": P.BATCH, "q": self.seq, "c": list(calls)}, *frames)

    def close(self) -> None:
        self.socket.close(0)


@pytest.fixture
def clients(module_emulated_agent: Any) -> Iterator[tuple[RawClient, RawClient]]:
    bad, good = RawClient(module_emulated_agent.endpoint), RawClient(module_emulated_agent.endpoint)
    try:
        yield bad, good
    finally:
        bad.close()
        good.close()


def good_client_still_served(good: RawClient) -> None:
    welcome = good.hello()
    base = welcome["range"][0]
    reply, frames = good.batch(["alloc", base, P.GRANULARITY], ["htod", base, b"harp", None],
                               ["dtoh", base, 4, None], ["free", base])
    assert reply["e"] is None
    assert bytes(frames[0]) == b"harp"


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
])
def test_bad_calls_get_clear_errors(clients: tuple[RawClient, RawClient], call: list[Any],
                                    kind: str) -> None:
    bad, good = clients
    bad.hello()
    reply, _ = bad.batch(["synchronize"], call, ["ping"])
    assert reply["e"]["kind"] == kind, reply["e"]
    assert reply["e"]["i"] == 1
    assert [index for index, _ in reply["r"]] == [0, 2]  # the rest of the batch still ran
    good_client_still_served(good)


def test_freed_memory_is_refused_and_sessions_cannot_see_each_other(
        clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    base = bad.hello()["range"][0]
    other_base = good.hello()["range"][0]
    assert other_base != base
    reply, _ = bad.batch(["alloc", base, P.GRANULARITY], ["free", base],
                         ["dtoh", base, 4, None])
    assert reply["e"]["kind"] == "HandleError" and "not inside memory" in reply["e"]["msg"]
    reply, _ = good.batch(["alloc", other_base, P.GRANULARITY])
    assert reply["e"] is None
    reply, _ = bad.batch(["dtoh", other_base, 4, None])
    assert reply["e"]["kind"] == "HandleError"


def test_out_of_memory_is_a_memory_error(clients: tuple[RawClient, RawClient]) -> None:
    bad, good = clients
    base = bad.hello()["range"][0]
    reply, _ = bad.batch(["alloc", base, 64 << 30])  # the emulated device has 16 GiB
    assert reply["e"]["kind"] == "MemoryError" and "out of memory" in reply["e"]["msg"]
    good_client_still_served(good)


def test_wrong_token_is_refused(agent_starter: Any) -> None:
    agent = agent_starter("--token", "s3cret")
    client = RawClient(agent.endpoint)
    try:
        assert client.hello(token="wrong")["e"]["kind"] == "AuthError"
        assert client.hello(token="s3cret")["t"] == P.WELCOME
    finally:
        client.close()
