"""Busy polling before a blocking receive (gpu_agent.multipart.busy_poll): what it returns, and
the bounds on how long the agent's flag and the client's variable may ask for."""

from __future__ import annotations

import pytest
import zmq

from gpu_agent import cli, multipart
from harp_jupyter.shim import transport


@pytest.fixture
def pair() -> tuple[zmq.Socket, zmq.Socket]:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://busy-poll")
    b.connect("inproc://busy-poll")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


def test_busy_poll_sees_a_waiting_message_and_gives_up_on_none(pair) -> None:
    a, b = pair
    assert multipart.busy_poll(b, 1000) is False  # nothing sent: it stops at its deadline
    a.send(b"hello")
    assert multipart.busy_poll(b, 10_000_000_000) is True  # returns once it is there
    assert [f.bytes for f in multipart.receive(b, 1000)] == [b"hello"]


def test_agent_flag_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--listen", "tcp://127.0.0.1:0", "--busy-poll-us", "250"]
                             ).busy_poll_us == 250
    for wrong in ("1001", "-1", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--listen", "tcp://127.0.0.1:0", "--busy-poll-us", wrong])
    assert "--busy-poll-us" in capsys.readouterr().err


def test_client_variable_is_checked_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_BUSY_POLL_US", "150")
    assert transport.busy_poll_from_env() == 150_000
    monkeypatch.setenv("HARP_BUSY_POLL_US", "99999999")
    assert transport.busy_poll_from_env() == multipart.MAX_BUSY_POLL_US * 1000
    monkeypatch.setenv("HARP_BUSY_POLL_US", "-5")
    assert transport.busy_poll_from_env() == 0
    monkeypatch.setenv("HARP_BUSY_POLL_US", "fast")
    with pytest.raises(ValueError, match="HARP_BUSY_POLL_US must be a whole number"):
        transport.busy_poll_from_env()


def test_busy_polling_is_on_by_default_only_where_the_cpus_are(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert multipart.usable_cpus(str(limit)) == min(1.5, len(os.sched_getaffinity(0)))
    limit.write_text("max 100000\n")
    assert multipart.usable_cpus(str(limit)) == len(os.sched_getaffinity(0))
    assert multipart.usable_cpus(str(tmp_path / "absent")) == len(os.sched_getaffinity(0))
    monkeypatch.delenv("HARP_BUSY_POLL_US", raising=False)
    for cpus, expected_us in ((16.0, multipart.BUSY_POLL_US), (2.0, 0)):
        monkeypatch.setattr(multipart, "usable_cpus", lambda cpus=cpus: cpus)
        assert multipart.default_busy_poll_us() == expected_us
        assert transport.busy_poll_from_env() == expected_us * 1000
        assert cli.build_parser().parse_args(["--listen", "tcp://127.0.0.1:0"]
                                             ).busy_poll_us == expected_us
