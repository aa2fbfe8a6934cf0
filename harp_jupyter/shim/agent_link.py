"""AgentLink: where a session's agent is, and how the session is opened (or restored) on it.

Opening takes three steps (docs/forwarding-design.md, "The shim's session"): a lease from the
lease source, a hello on the agent's control connection (with the resume facts of the session it
had, when it had one), and an attach on the worker connection the welcome names. The link keeps
what a later connect needs: the resume facts, the lease the connection was opened under, the
welcome, and the connections of earlier leases to close. Calls travel on the worker connection,
through the session's ``BatchWriter``; the link does not send them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpu_agent import protocol
from harp_jupyter.shim import hooks
from harp_jupyter.shim.endpoints import configured_endpoint
from harp_jupyter.shim.errors import (
    Error,
    GPULostError,
    LeaseLostError,
    ProtocolError,
    StateLostError,
)
from harp_jupyter.shim.lease import Grant, LeaseHolder, LeaseSource, get_lease_source
from harp_jupyter.shim.notice import WaitNotice
from harp_jupyter.shim.transport import AgentConnection

if TYPE_CHECKING:
    from harp_jupyter.shim.batch import BatchWriter

#: how many times one connect leases again when its lease ended before its hello came
REGRANT_ATTEMPTS = 5


@dataclass
class Opened:
    """A session opened on an agent, not yet taken into use (``AgentLink.commit``)."""

    connection: AgentConnection
    data: AgentConnection
    welcome: dict[str, Any]
    grant: Grant
    resume: dict[str, Any] | None
    asked: int
    granted: int
    base: int
    size: int
    #: the largest frame the session's worker takes (an agent that predates it: the protocol's)
    max_frame: int = protocol.MAX_FRAME_BYTES

    def close(self) -> None:
        self.connection.close()
        self.data.close()


class AgentLink:
    """The lease, hello and attach of one session, and what a reconnect needs of them."""

    def __init__(self, endpoint: str | None, *, token: str | None, timeout: float | None,
                 lease_source: LeaseSource | None, holder: LeaseHolder,
                 on_state_lost: Callable[[Error], None]) -> None:
        self._endpoint = endpoint
        self._lease_source = lease_source
        self._holder = holder
        #: the session's hook: its state on the agent is gone (the next GPU call starts afresh)
        self._on_state_lost = on_state_lost
        self.token = token
        self.timeout = timeout
        #: {session, resume_token, agent} once the agent welcomed us; kept while parked
        self.resume: dict[str, Any] | None = None
        #: the id of the lease the current connection was opened with
        self.lease_id: str | None = None
        #: the control connection of the current lease (None while parked)
        self.connection: AgentConnection | None = None
        self.welcome: dict[str, Any] = {}
        #: device_info read from the agents' status before the first lease
        self.device_facts: dict[str, Any] | None = None
        #: writers and connections of earlier leases, closed at the next connect
        self.stale: list[tuple[BatchWriter, AgentConnection]] = []

    @property
    def endpoint(self) -> str:
        """The agent this session talks to now (or last did)."""
        if self.resume is not None:
            return str(self.resume["agent"])
        if self._endpoint is None:
            self._endpoint = configured_endpoint()
        return self._endpoint

    @property
    def lease_source(self) -> LeaseSource:
        if self._lease_source is None:
            self._lease_source = get_lease_source(self._endpoint)
            self._lease_source.holder = self._holder
        return self._lease_source

    @property
    def has_lease_source(self) -> bool:
        return self._lease_source is not None

    def open(self, address_range: tuple[int, int] | None) -> Opened:
        """Lease a GPU, say hello (resuming the session it had, if any) and attach to the
        worker; the session's range must be ``address_range`` when one is given."""
        source = self.lease_source
        notice = WaitNotice()
        asked = time.monotonic_ns()
        refused: str | None = None
        for attempt in itertools.count(1):
            grant = source.acquire(self.resume, notice, refused)
            granted = time.monotonic_ns()
            resume = None
            if self.resume is not None:
                resume = {"session": self.resume["session"],
                          "resume_token": self.resume["resume_token"]}
                origin = grant.moved_from or self.resume["agent"]
                if origin != grant.agent:
                    resume["from"] = origin
                    notice.update("restoring", agent=grant.agent)
            connection = AgentConnection(grant.agent, token=self.token, timeout=self.timeout)
            try:
                welcome = connection.hello(lease=grant.lease, resume=resume,
                                           address_range=address_range)
                break
            except LeaseLostError:
                # granted, then ended (reclaimed, expired) before this hello under load: queue
                # again, as if it had never been granted
                connection.close()
                if attempt >= REGRANT_ATTEMPTS:
                    raise
                refused = grant.lease[0]
            except Error as e:
                connection.close()
                if isinstance(e, StateLostError) and grant.state_lost:
                    # the agent can only say it has no such state: say why there is none
                    lost = StateLostError(drained_state_message(grant.state_lost))
                    self._on_state_lost(lost)
                    raise lost from None
                if isinstance(e, StateLostError | GPULostError):
                    self._on_state_lost(e)
                raise
        data: AgentConnection | None = None
        try:
            base, size = welcome["range"]
            max_frame = int(welcome.get("max_frame", protocol.MAX_FRAME_BYTES))
            if not 0 < max_frame <= protocol.MAX_FRAME_BYTES:
                raise ValueError(f"max_frame {max_frame}")
            data = AgentConnection(worker_endpoint(str(welcome["worker"]), grant.agent),
                                   token=self.token, timeout=self.timeout, label=grant.agent)
            data.attach(welcome["session"], str(welcome["attach"]))
        except Error as e:
            connection.close()
            if data is not None:
                data.close()
            if isinstance(e, StateLostError | GPULostError):
                self._on_state_lost(e)  # the state is gone: say so now
            raise
        except (KeyError, TypeError, ValueError) as e:
            connection.close()
            if data is not None:
                data.close()
            raise ProtocolError(f"malformed welcome from {grant.agent}: {e!r}") from None
        return Opened(connection, data, welcome, grant, resume, asked, granted, base, size,
                      max_frame)

    def commit(self, opened: Opened) -> None:
        """Take ``opened`` into use: its connection is the link's, its welcome the resume's."""
        grant, welcome = opened.grant, opened.welcome
        hooks.note_lease_span("acquire", opened.asked, opened.granted, agent=grant.agent)
        hooks.note_lease_span("restore" if opened.resume else "hello", opened.granted,
                              time.monotonic_ns(), agent=grant.agent,
                              moved_from=(opened.resume or {}).get("from"))
        self.connection = opened.connection
        self.lease_id = grant.lease[0]
        self.welcome = welcome
        self.resume = {"session": welcome["session"], "resume_token": welcome["resume_token"],
                       "agent": grant.agent}

    def read_device_facts(self) -> dict[str, Any] | None:
        """device_info from the agents' status (asked once), without leasing."""
        if self.device_facts is None:
            self.device_facts = self.lease_source.device_facts(self.resume)
        return self.device_facts

    def attached_under(self, lease_id: str | None) -> bool:
        return self.lease_id is not None and lease_id in (None, self.lease_id)

    def retire(self, writer: BatchWriter, connection: AgentConnection) -> None:
        """Keep a writer and connection of an earlier lease, to close at the next connect."""
        self.stale.append((writer, connection))

    def close_stale(self) -> None:
        stale, self.stale = self.stale, []
        for writer, connection in stale:
            writer.close()
            writer.connection.close()
            connection.close()


def drained_state_message(why: str) -> str:
    """The error of the first GPU call after the keeper learned that the parked state went with
    a drained agent (``why``)."""
    return (f"your parked GPU state is gone: {why}. Its device arrays, modules and streams no "
            "longer exist; your Python process and its variables are intact, and the next GPU "
            "call starts a fresh session: re-run the code that creates your device arrays.")


def worker_endpoint(advertised: str, agent: str) -> str:
    """The worker's endpoint as this machine reaches it: a worker bound on every interface
    (``tcp://0.0.0.0:PORT``) is at the host this client reached the agent at."""
    scheme, _, rest = advertised.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "*", "::", "[::]", ""):
        agent_host = agent.partition("://")[2].rpartition(":")[0]
        return f"{scheme}://{agent_host}:{port}"
    return advertised
