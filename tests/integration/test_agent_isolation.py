"""One tenant can never take the GPU from the others: attacks and faults against a real agent.

Each test starts a real ``harp-agent`` (emulated executor: a supervisor and worker processes) and
speaks the protocol by hand (``RawClient``) to do what the shim never would, then checks that the
attacker got a clear error and everyone else was untouched. Memory bounds are read from the
processes' RSS against the bound the test set.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from gpu_agent import protocol as P
from tests.agent_client import RawClient, read_back, stored, wait_for

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def workers_of(agent: Any) -> list[psutil.Process]:
    return psutil.Process(agent.process.pid).children()


def worker_serving(agent: Any, welcome: dict) -> psutil.Process:
    port = int(welcome["worker"].rsplit(":", 1)[1])
    for child in workers_of(agent):
        for connection in child.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return child
    raise AssertionError("no worker listens on the session's port")


# {{{ hostile calls


@pytest.mark.parametrize("dtype", ["|O", "<U4", "|S8", "|V8", "<M8[s]",
                                   "[('a', '<f4'), ('b', '|O')]", "x" * 300])
def test_object_and_non_numeric_dtypes_are_refused_wherever_they_appear(
        module_emulated_agent: Any, dtype: str) -> None:
    client = RawClient(module_emulated_agent.endpoint)
    try:
        base = stored(client, b"\x01" * 16)
        desc = [base, dtype, [2], [8]]
        reply, _ = client.batch(["array", "multiply", desc, [desc, 2], {}, None],
                                ["array", "fill", [base, "<f8", [2], [8]], [desc], {}, None],
                                ["data_write", desc, "x.npy", {}])
        assert reply["e"]["kind"] == "ProtocolError" and reply["e"]["i"] == 0
        assert read_back(client, base, 16) == b"\x01" * 16  # and the worker is still there
    finally:
        client.close()


def test_structured_numeric_dtypes_are_allowed() -> None:
    assert P.wire_dtype("[('a', '<f4'), ('b', '<i8', (2,))]") is not None
    assert P.wire_dtype("|O") is None and P.wire_dtype("[('a', '|O')]") is None


def test_a_stride_0_view_is_costed_at_its_full_shape(module_emulated_agent: Any) -> None:
    client = RawClient(module_emulated_agent.endpoint)
    try:
        base = stored(client, b"\0" * 8)
        huge = [base, "<f8", [1 << 40], [0]]  # 8 bytes of memory, 2**40 elements of work
        reply, _ = client.batch(["array", "add", huge, [huge, 1.0], {}, None],
                                ["array", "sum", [base, "<f8", [], []], [huge], {}, None])
        assert reply["e"]["kind"] == "LogicError"
        assert "larger than this GPU slot's memory" in reply["e"]["msg"]
        small = [base, "<f8", [4], [0]]  # a small broadcast is fine
        reply, _ = client.batch(["array", "sum", [base, "<f8", [], []], [small], {}, None])
        assert reply["e"] is None
    finally:
        client.close()


def test_one_session_per_lease_repeated_hello_is_refused(module_emulated_agent: Any) -> None:
    client = RawClient(module_emulated_agent.endpoint)
    try:
        client.hello()
        for _ in range(20):  # once each parked the previous session and filled every slot
            reply = client.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {},
                                    "lease": [client.lease["id"], client.lease["token"]]})[0]
            assert reply["e"]["kind"] == "SessionError"
        sessions = client.status()["leases"]["sessions"]
        assert len([s for s in sessions if s["kernel_id"] == client.kernel_id]) == 1
    finally:
        client.close()


@pytest.mark.parametrize("ttl", [math.nan, math.inf, "forever"])
def test_a_lease_ttl_that_is_not_finite_is_refused(module_emulated_agent: Any, ttl: Any) -> None:
    client = RawClient(module_emulated_agent.endpoint)
    try:
        reply, _ = client.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "k-ttl",
                                   "kernel_secret": "s", "ttl": ttl})
        assert reply["t"] == P.ERROR and reply["e"]["kind"] == "ProtocolError"
        assert "finite" in reply["e"]["msg"]
    finally:
        client.close()


def test_a_queue_flood_is_bounded_and_the_agent_keeps_answering(agent_starter: Any) -> None:
    agent = agent_starter("--max-queue", "50")
    holder, flood = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        holder.take_lease()
        refused = 0
        for i in range(200):
            reply, _ = flood.request({"t": P.LEASE_REQUEST, "rid": i, "kernel_id": f"f{i}",
                                      "kernel_secret": "s"})
            refused += reply["t"] == P.ERROR and "queue is full" in reply["e"]["msg"]
        assert refused == 150
        assert len(flood.status()["leases"]["queue"]) == 50
    finally:
        holder.close()
        flood.close()


def test_kernel_secrets_are_forgotten_with_their_leases(agent_starter: Any) -> None:
    agent = agent_starter()
    client = RawClient(agent.endpoint)
    try:
        rss = psutil.Process(agent.process.pid).memory_info().rss
        for i in range(200):
            reply, _ = client.request({"t": P.LEASE_REQUEST, "rid": i, "kernel_id": f"k{i}",
                                       "kernel_secret": "x" * 256})
            lease = reply["lease"]
            client.request({"t": P.LEASE_RELEASE, "rid": i, "lease_id": lease["id"],
                            "token": lease["token"]})
        reply, _ = client.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "big",
                                   "kernel_secret": "x" * 4096})
        assert reply["t"] == P.ERROR and "at most 256 characters" in reply["e"]["msg"]
        flooder = RawClient(agent.endpoint, timeout_ms=500)
        with pytest.raises(zmq.Again):  # past --max-control-message: dropped unread
            flooder.request({"t": P.LEASE_REQUEST, "rid": 1, "kernel_id": "big",
                             "kernel_secret": "x" * (2 << 20)})
        flooder.close()
        # k0's secret is gone with its lease: another secret may take the id now
        reply, _ = client.request({"t": P.LEASE_REQUEST, "rid": 2, "kernel_id": "k0",
                                   "kernel_secret": "another"})
        assert reply["t"] == P.LEASE
        grown = psutil.Process(agent.process.pid).memory_info().rss - rss
        assert grown < 32 * MiB, grown
    finally:
        client.close()


def test_an_oversized_message_is_dropped_unread_before_authentication(
        agent_starter: Any) -> None:
    agent = agent_starter("--token", "t0k3n", "--max-control-message", "1MiB")
    supervisor = psutil.Process(agent.process.pid)
    rss = supervisor.memory_info().rss
    for _ in range(8):
        attacker = zmq.Context.instance().socket(zmq.DEALER)
        attacker.setsockopt(zmq.LINGER, 0)
        attacker.connect(agent.endpoint)
        attacker.send(b"\0" * (64 * MiB))  # ZeroMQ's maxmsgsize drops it and the connection
        attacker.close(0)
    client = RawClient(agent.endpoint)
    try:
        reply = client.status(token="t0k3n")
        assert reply["t"] == P.STATUS and "leases" in reply
        assert supervisor.memory_info().rss - rss < 64 * MiB
    finally:
        client.close()


def test_status_without_the_token_says_only_that_the_agent_is_alive(agent_starter: Any) -> None:
    agent = agent_starter("--token", "t0k3n")
    holder, stranger = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        holder.hello(token="t0k3n")
        probe = stranger.status()
        assert probe["alive"] is True and "leases" not in probe and "device" not in probe
        assert holder.kernel_id not in str(probe)
        full = stranger.status(token="t0k3n")
        assert holder.kernel_id in str(full["leases"])
        mine = stranger.status(token="t0k3n", scope="kernel")
        assert holder.kernel_id not in str(mine["leases"])  # a kernel sees only its own
        own = holder.status(token="t0k3n", scope="kernel", kernel_id=holder.kernel_id,
                            kernel_secret="secret")
        assert holder.kernel_id in str(own["leases"])
    finally:
        holder.close()
        stranger.close()


def test_10000_fuzzed_messages_leave_the_agent_serving(agent_starter: Any) -> None:
    agent = agent_starter("--slots", "2")
    rng = random.Random(20261201)
    good, fuzzer = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = stored(good, b"good")
        fuzzer.hello()
        fbase = fuzzer.welcome["range"][0]
        ops = list(P.OPS)
        values: list[Any] = [None, 0, -1, 2**63, 2**64 - 1, -(2**63), fbase, fbase + 4, 1.5,
                             math.nan,
                             "", "x" * 1000, "<f4", "|O", b"", b"\0" * 9, [], [1, 2, 3],
                             {"out2": [fbase, "|O", [1], [0]]}, [fbase, "<f8", [2**40], [0]],
                             [fbase, "<f4", [3], [-4]], True, P.FrameRef(3)]
        for i in range(10_000):
            kind = rng.random()
            if kind < 0.6:
                call = [rng.choice(ops), *(rng.choice(values) for _ in range(rng.randrange(7)))]
                frames = [P.pack_header({"t": P.BATCH, "q": i, "c": [call]})]
                target = fuzzer.data
            elif kind < 0.8:
                header = {"t": rng.choice([P.HELLO, P.LEASE_RENEW, P.PARK, P.PARKED_FETCH,
                                           P.DROP_PARKED, P.LEASE_REQUEST, "x", P.ATTACH]),
                          **{rng.choice(["rid", "lease", "session", "ttl", "kernel_id",
                                         "resume"]): rng.choice(values)}}
                frames = [msgpack.packb(header, default=repr)]
                target = fuzzer.socket if rng.random() < 0.5 else fuzzer.data
            else:
                frames = [rng.randbytes(rng.randrange(1, 64))]
                target = fuzzer.socket if rng.random() < 0.5 else fuzzer.data
            assert target is not None
            try:  # a fuzzed park or bye may end the fuzzer's own session: never wait on it
                target.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass
            for socket in (fuzzer.socket, fuzzer.data):
                while socket is not None and socket.poll(0):
                    socket.recv_multipart()
        assert agent.process.poll() is None
        assert read_back(good, base, 4) == b"good"
        assert good.status()["t"] == P.STATUS
    finally:
        good.close()
        fuzzer.close()


# }}}

# {{{ faults stay with their tenant


def test_a_killed_worker_ends_that_session_alone(agent_starter: Any) -> None:
    agent = agent_starter("--slots", "2")
    victim, neighbour, parked = (RawClient(agent.endpoint) for _ in range(3))
    try:
        parked_base = stored(parked, b"parked!!")
        parked.release()  # parked: its worker ends, its memory is in the park store
        parked.next_push(P.LOST)
        neighbour_base = stored(neighbour, b"neighbour")
        stored(victim, b"victim")
        worker_serving(agent, victim.welcome).send_signal(signal.SIGKILL)
        notice = victim.next_push(P.LOST)
        assert notice["e"]["kind"] == "StateLost" and "died" in notice["e"]["msg"]
        assert "other users of this GPU were not affected" in notice["e"]["msg"]
        # the agent cannot know whether a notebook or a script is its client: no cells
        assert "re-run the code that creates your device arrays" in notice["e"]["msg"]
        assert "cell" not in notice["e"]["msg"] and "notebook" not in notice["e"]["msg"]
        assert read_back(neighbour, neighbour_base, 9) == b"neighbour"
        assert agent.process.poll() is None
        status = neighbour.status()
        assert status["workers"]["restarts"] >= 1
        # the parked tenant comes back intact, in the slot the victim's kernel gives back
        victim.release()
        parked.take_lease()
        welcome = parked.hello(resume={"session": parked.welcome["session"],
                                       "resume_token": parked.welcome["resume_token"]})
        assert welcome["t"] == P.WELCOME, welcome
        assert read_back(parked, parked_base, 8) == b"parked!!"
        # the victim's next session starts afresh on a new worker
        parked.release()
        assert victim.hello()["t"] == P.WELCOME
    finally:
        for client in (victim, neighbour, parked):
            client.close()


def test_slots_cap_each_tenants_memory_and_report_it(agent_starter: Any) -> None:
    agent = agent_starter("--slots", "2", "--slot-memory", "64MiB")
    a, b = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base_a, base_b = a.hello()["range"][0], b.hello()["range"][0]  # both hold at once
        reply, _ = a.batch(["mem_get_info"], ["alloc", base_a, 32 * MiB],
                           ["alloc", base_a + 32 * MiB, 34 * MiB], ["mem_get_info"])
        assert reply["r"][0][1] == [64 * MiB, 64 * MiB]
        assert reply["e"]["kind"] == "MemoryError" and reply["e"]["i"] == 2
        assert "slot" in reply["e"]["msg"]
        assert reply["r"][1][1] == [32 * MiB, 64 * MiB]
        reply, _ = b.batch(["alloc", base_b, 64 * MiB])
        assert reply["e"] is None  # a's use does not count against b's slot
        status = a.status()
        assert status["leases"]["slots"] == 2 and len(status["leases"]["holders"]) == 2
    finally:
        a.close()
        b.close()


def test_the_watchdog_ends_a_session_whose_call_runs_too_long(agent_starter: Any) -> None:
    agent = agent_starter("--watchdog", "1")
    client, other = RawClient(agent.endpoint, timeout_ms=30_000), RawClient(agent.endpoint)
    try:
        base = client.hello()["range"][0]
        n = 64 * MiB
        desc = [base, "<f8", [n // 8], [8]]
        reply, _ = client.batch(["alloc", base, n])
        assert reply["e"] is None
        assert client.data is not None
        client.data.send_multipart(P.encode({"t": P.BATCH, "q": 99, "c": [
            ["array", "power", desc, [desc, 1.0001], {}, None] for _ in range(400)]}))
        notice = client.next_push(P.LOST)
        assert "watchdog" in notice["e"]["msg"]
        assert client.hello()["t"] == P.WELCOME  # its kernel's next GPU call starts afresh
        client.release()
        assert other.hello()["t"] == P.WELCOME
    finally:
        client.close()
        other.close()


def test_a_session_too_large_to_park_is_dropped_with_a_clear_error(agent_starter: Any) -> None:
    agent = agent_starter("--park-memory", "4MiB", "--park-limit", "8MiB")
    client, next_one = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        base = client.hello()["range"][0]
        reply, _ = client.batch(["alloc", base, 16 * MiB])
        assert reply["e"] is None
        client.release()  # its 16 MiB can't be parked in 8 MiB: dropped, never an OOM
        notice = client.next_push(P.LOST)
        assert notice["e"]["kind"] == "StateLost" and "--park-limit" in notice["e"]["msg"]
        assert agent.process.poll() is None
        stored(next_one, b"fine")
        assert read_back(next_one, next_one.welcome["range"][0], 4) == b"fine"
        assert client.status()["leases"]["parked"] == []
    finally:
        client.close()
        next_one.close()


def test_a_forged_adopt_cannot_drop_another_kernels_parked_state(agent_starter: Any) -> None:
    agent = agent_starter()
    victim, attacker = RawClient(agent.endpoint), RawClient(agent.endpoint)
    fake = zmq.Context.instance().socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    fake_endpoint = f"tcp://127.0.0.1:{fake.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        base = stored(victim, b"victim's")
        victim_session = victim.welcome["session"]
        victim.release()
        victim.next_push(P.LOST)
        # 1. naming the victim's session id with a guessed token
        attacker.take_lease()
        reply = attacker.request({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {},
                                  "lease": [attacker.lease["id"], attacker.lease["token"]],
                                  "resume": {"session": victim_session, "resume_token": "guess",
                                             "from": fake_endpoint}})[0]
        assert reply["e"]["kind"] == "LeaseError"
        # 2. a fresh id whose fake origin answers with a manifest of the victim's session
        other_base = P.ADDRESS_SPACE_BASE + 200 * P.SESSION_RANGE_SIZE
        reply_box: list[dict] = []

        def answer_fake_fetch() -> None:
            if fake.poll(10_000):
                route, raw = fake.recv_multipart()
                request = P.unpack_header(raw)
                fake.send_multipart([route, P.pack_header({
                    "t": P.PARKED_STATE, "rid": request["rid"], "manifest": {
                        "session": victim_session, "kernel_id": attacker.kernel_id,
                        "range": [other_base, P.SESSION_RANGE_SIZE], "log": [],
                        "chunks": []}})])

        import threading
        thread = threading.Thread(target=answer_fake_fetch)
        thread.start()
        reply_box.append(attacker.request({
            "t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {},
            "lease": [attacker.lease["id"], attacker.lease["token"]], "range": [other_base, 0],
            "resume": {"session": "attacker-1", "resume_token": "t", "from": fake_endpoint}})[0])
        thread.join()
        assert reply_box[0]["e"]["kind"] == "StateLost", reply_box[0]
        assert "something else than was asked" in reply_box[0]["e"]["msg"]
        attacker.release()
        # the victim's parked state is intact
        victim.take_lease()
        welcome = victim.hello(resume={"session": victim_session,
                                       "resume_token": victim.welcome["resume_token"]})
        assert welcome["t"] == P.WELCOME, welcome
        assert read_back(victim, base, 8) == b"victim's"
    finally:
        victim.close()
        attacker.close()
        fake.close(0)


def test_a_resume_from_an_agent_that_never_answers_does_not_block_the_agent(
        agent_starter: Any) -> None:
    agent = agent_starter("--fetch-timeout", "30")
    frozen = zmq.Context.instance().socket(zmq.ROUTER)  # takes connections, answers nothing
    frozen.setsockopt(zmq.LINGER, 0)
    port = frozen.bind_to_random_port("tcp://127.0.0.1")
    stuck, other = RawClient(agent.endpoint), RawClient(agent.endpoint)
    try:
        stuck.take_lease()
        stuck.socket.send_multipart(P.encode({
            "t": P.HELLO, "v": P.PROTOCOL_VERSION, "client": {}, "rid": 5,
            "lease": [stuck.lease["id"], stuck.lease["token"]],
            "range": [P.ADDRESS_SPACE_BASE + 7 * P.SESSION_RANGE_SIZE, 0],
            "resume": {"session": "s", "resume_token": "t", "from": f"tcp://127.0.0.1:{port}"}}))
        for _ in range(20):  # the supervisor answers while the fetch waits
            assert other.status()["t"] == P.STATUS
        # the stuck hello is still unanswered: those answers came while its fetch was waiting
        assert not stuck.socket.poll(0)
    finally:
        stuck.close()
        other.close()
        frozen.close(0)


def test_a_program_killed_while_holding_the_gpu_frees_it_at_once(
        emulated_agent: Any, tmp_path: Path) -> None:
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent("""\
        import numpy as np
        import pycuda.autoinit
        import pycuda.gpuarray as gpuarray
        x = gpuarray.to_gpu(np.ones(16 << 20, np.float32))  # 64 MiB
        print(float(x.get()[0]), flush=True)
        input()
    """))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENTS=emulated_agent.endpoint)
    job = subprocess.Popen([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    observer = RawClient(emulated_agent.endpoint)
    try:
        assert job.stdout is not None and job.stdout.readline().strip() == "1.0"
        job.kill()
        job.wait()

        def freed() -> bool:
            leases = observer.status()["leases"]
            return not leases["holders"] and not leases["parked"] and not leases["sessions"]

        wait_for(freed, 15, "the killed program's lease and session to go")
    finally:
        observer.close()
        if job.poll() is None:
            job.kill()


def test_a_short_script_says_bye_and_is_never_parked(emulated_agent: Any,
                                                      tmp_path: Path) -> None:
    script = tmp_path / "short.py"
    script.write_text("import numpy as np\nimport pycuda.autoinit\nimport pycuda.gpuarray as g\n"
                      "print(g.to_gpu(np.arange(4.0)).get().sum())\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HARP_")}
    env.update(PYTHONPATH=str(REPO), HARP_AGENTS=emulated_agent.endpoint)
    done = subprocess.run([sys.executable, "-m", "harp_jupyter.cli", "run", str(script)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "6.0", done.stderr
    observer = RawClient(emulated_agent.endpoint)
    try:
        wait_for(lambda: not observer.status()["leases"]["sessions"], 10, "the session to end")
        assert observer.status()["leases"]["parked"] == []
    finally:
        observer.close()


# }}}


def test_every_executor_implements_every_operation() -> None:
    from gpu_agent.executors.emulated import EmulatedSession
    from gpu_agent.executors.torch_ops import TorchOps

    pycuda_exec = (REPO / "gpu_agent/executors/pycuda_exec.py").read_text()
    # the torch ops are one mixin both executors' sessions inherit
    pycuda_has_torch = "class PycudaSession(TorchOps, ExecutorSession)" in pycuda_exec
    for name in P.OPS:
        assert hasattr(EmulatedSession, f"op_{name}"), name
        assert f"def op_{name}(" in pycuda_exec or name.startswith("data_") or name in (
            "profile_gpu", "nvtx_push", "nvtx_pop") or (
            pycuda_has_torch and hasattr(TorchOps, f"op_{name}")), name
    assert np.dtype(P.wire_dtype("<f4")) == np.float32
