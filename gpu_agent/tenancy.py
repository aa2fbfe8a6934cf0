"""Who uses this agent's GPU and what they keep on it: leases, sessions, parked state.

``Tenancy`` is the agent's authority logic with no sockets: the server hands it requests and
ticks, and sends what it returns. The GPU belongs to the holder of the one held lease; only
sessions of that lease's kernel are active. When a lease ends (released, revoked, expired), its
kernel's active sessions are parked before the next lease is granted, so a new tenant never finds
another's memory mapped, and the parked owner finds its memory intact at the same addresses.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from gpu_agent import protocol as P
from gpu_agent.executors.base import Executor, ExecutorError
from gpu_agent.leases import Lease, LeaseError, LeaseState, LeaseTable
from gpu_agent.parking import ParkStore
from gpu_agent.sessions import ACTIVE, PARKED, ClientSession

log = logging.getLogger("harp.agent.tenancy")

MAX_SESSIONS = 256
MOVED = "it moved to another agent"
#: ended leases are remembered this long, so a late renew gets "released" rather than "unknown"
FORGET_ENDED_S = 600.0


class TenancyError(Exception):
    def __init__(self, kind: str, msg: str, code: str | None = None) -> None:
        super().__init__(msg)
        self.kind, self.code = kind, code


class Tenancy:
    def __init__(self, executor: Executor, endpoint: str, *, lease_ttl: float,
                 parking: ParkStore) -> None:
        self.executor = executor
        self.endpoint = endpoint
        self.leases = LeaseTable(ttl=lease_ttl)
        self.parking = parking
        self.sessions: dict[str, ClientSession] = {}
        self._kernel_secrets: dict[str, str] = {}
        #: last queue position told to each queued lease, to push only changes
        self._told: dict[str, int] = {}

    # {{{ leases

    def request(self, header: dict[str, Any]) -> tuple[Lease, list[Lease]]:
        kernel_id, secret = header.get("kernel_id"), header.get("kernel_secret")
        if not (isinstance(kernel_id, str) and kernel_id and isinstance(secret, str) and secret):
            raise TenancyError("ProtocolError", "lease_request needs string kernel_id and "
                               "kernel_secret")
        known = self._kernel_secrets.get(kernel_id)
        if known is not None and not secrets.compare_digest(known, secret):
            raise TenancyError("LeaseError", f"kernel {kernel_id} is known here with another "
                               "kernel_secret: refused")
        self._kernel_secrets[kernel_id] = secret
        ttl = header.get("ttl")
        info = header.get("info") if isinstance(header.get("info"), dict) else {}
        user = header.get("user") if isinstance(header.get("user"), str) else ""
        changed = self.leases.request(kernel_id, user, info,
                                      ttl if isinstance(ttl, int | float) else None)
        lease = changed[0]
        self._told[lease.lease_id] = self.leases.position(lease.lease_id)  # the reply says it
        log.info("lease %s for kernel %s: %s", lease.lease_id, kernel_id, lease.state.value)
        return lease, changed[1:]

    def renew(self, header: dict[str, Any]) -> Lease:
        lease_id, token = self._lease_ref(header)
        try:
            return self.leases.renew(lease_id, token)
        except LeaseError as e:
            raise TenancyError("LeaseError", self._ended_message(lease_id, e)) from None

    def release(self, header: dict[str, Any]) -> tuple[Lease, list[Lease]]:
        lease_id, token = self._lease_ref(header)
        try:
            changed = self.leases.release(lease_id, token)
        except LeaseError as e:
            raise TenancyError("LeaseError", self._ended_message(lease_id, e)) from None
        return changed[0], self.settle(changed)

    def tick(self) -> list[Lease]:
        """Expire unrenewed leases and old parked state; the leases whose owners must hear."""
        changed = self.settle(self.leases.expire())
        self.leases.forget(FORGET_ENDED_S)
        for session_id in self.parking.expire():
            self._forget(session_id)
        return changed

    def settle(self, changed: list[Lease]) -> list[Lease]:
        """Act on lease changes (park the sessions of ended leases); returns the leases to tell,
        ended ones first, then grants and queue moves, in that order."""
        ended = [lease for lease in changed if not lease.active]
        for lease in ended:
            for session in self.sessions_of(lease.kernel_id, ACTIVE):
                self.park(session, f"its lease was {lease.state.value}")
            self._told.pop(lease.lease_id, None)
        told = list(ended)
        for lease in [*changed, *self.leases.queue]:
            if not lease.active or lease in told:
                continue
            position = self.leases.position(lease.lease_id)
            if self._told.get(lease.lease_id) != position:
                self._told[lease.lease_id] = position
                told.append(lease)
        return told

    def held(self, ref: Any) -> Lease:
        """The held lease ``ref`` = [lease_id, token] names; TenancyError otherwise."""
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str) for x in ref)):
            raise TenancyError("LeaseError", "this client presented no lease: a GPU session needs "
                               "a lease held on this agent (lease_request first)")
        try:
            lease = self.leases.check(ref[0], ref[1])
        except LeaseError as e:
            raise TenancyError("LeaseError", self._ended_message(ref[0], e)) from None
        if lease.state is not LeaseState.HELD:
            raise TenancyError("LeaseError", f"lease {lease.lease_id} is still queued (position "
                               f"{self.leases.position(lease.lease_id)}): wait for the grant")
        return lease

    def _lease_ref(self, header: dict[str, Any]) -> tuple[str, str]:
        lease_id, token = header.get("lease_id"), header.get("token")
        if not (isinstance(lease_id, str) and isinstance(token, str)):
            raise TenancyError("ProtocolError", "needs string lease_id and token")
        return lease_id, token

    def _ended_message(self, lease_id: str, error: LeaseError) -> str:
        lease = self.leases.get(lease_id)
        if lease is not None and not lease.active:
            return (f"lease {lease_id} was {lease.state.value}: request a new one")
        return f"{error} (lease {lease_id})"

    def lease_info(self, lease: Lease, *, with_token: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": lease.lease_id, "state": lease.state.value, "kernel_id": lease.kernel_id,
            "user": lease.user, "agent": self.endpoint, "ttl": lease.ttl,
            "position": self.leases.position(lease.lease_id) if lease.active else None,
            "granted_at": _wall(lease.granted_at), "session": None,
        }
        if with_token:
            info["token"] = lease.token
        sessions = self.sessions_of(lease.kernel_id, ACTIVE) or self.sessions_of(
            lease.kernel_id, PARKED)
        if sessions:
            s = sessions[0]
            parked = self.parking.get(s.session_id)
            info["session"] = {
                "id": s.session_id, "state": s.state,
                "device_bytes": s.device.device_bytes() if s.state == ACTIVE else 0,
                "parked_bytes": parked.nbytes if parked else 0,
                "idle_s": round(time.monotonic() - s.last_active, 3),
                "busy": s.state == ACTIVE and s.device.busy(),
            }
        return info

    # }}}

    # {{{ sessions

    def sessions_of(self, kernel_id: str, state: str) -> list[ClientSession]:
        return [s for s in self.sessions.values() if s.kernel_id == kernel_id and s.state == state]

    def open(self, lease: Lease, routing_id: bytes, client: dict[str, Any],
             wanted_base: int | None = None, *, session_id: str | None = None,
             resume_token: str | None = None) -> ClientSession:
        slot = self._free_slot(wanted_base)
        base, size = P.session_range(slot)
        try:
            device = self.executor.open_session(base, size)
        except ExecutorError as e:
            raise TenancyError(e.kind, str(e), e.code) from None
        session = ClientSession(
            session_id or secrets.token_hex(8), routing_id, slot, base, size, device, client,
            kernel_id=lease.kernel_id, lease_id=lease.lease_id,
            resume_token=resume_token or secrets.token_urlsafe(18))
        _take_park_policy(session, lease)
        self.sessions[session.session_id] = session
        log.info("session %s opened for kernel %s", session.session_id, lease.kernel_id)
        return session

    def resume_here(self, lease: Lease, session_id: str, resume_token: str,
                    routing_id: bytes) -> ClientSession | None:
        """Restore a session parked on this agent; None when it was never here."""
        session = self.sessions.get(session_id)
        if session is None:
            reason = self.parking.dropped.get(session_id)
            if reason is not None and reason != MOVED:
                raise TenancyError("StateLost", _lost(reason))
            return None  # never here, or moved away: the caller fetches it from ``from``
        if session.kernel_id != lease.kernel_id or not secrets.compare_digest(
                session.resume_token, resume_token):
            raise TenancyError("LeaseError", f"session {session_id} belongs to another kernel")
        if session.state == PARKED:
            parked = self.parking.take(session_id)
            if parked is None:
                raise TenancyError("StateLost", _lost("its parked memory is gone"))
            try:
                self.executor.run(session.device.restore,
                                  [(c.addr, c.read()) for c in parked.chunks])
            except ExecutorError as e:
                # give the memory back to the store: the state is not lost, only not restorable now
                self.parking.put(session_id, [(c.addr, c.read()) for c in parked.chunks],
                                 ttl=session.park_ttl)
                if not self.executor.restart_required:
                    self.executor.run(session.device.park)
                raise TenancyError(e.kind, f"cannot restore this session's {parked.nbytes} bytes "
                                   f"of device memory on this GPU now: {e}", e.code) from None
            ParkStore.discard(parked)
            session.state = ACTIVE
            log.info("session %s restored (%d bytes)", session_id, parked.nbytes)
        session.lease_id = lease.lease_id
        _take_park_policy(session, lease)
        session.routing_id = routing_id
        session.last_active = time.monotonic()
        return session

    def adopt(self, lease: Lease, manifest: dict[str, Any], frames: list[Any],
              routing_id: bytes, resume_token: str) -> ClientSession:
        """Recreate a session whose parked state another agent sent (``parked_state``); it keeps
        its id, resume token and address range."""
        if manifest.get("kernel_id") != lease.kernel_id:
            raise TenancyError("LeaseError", "the parked session belongs to another kernel")
        base = manifest["range"][0]
        session = self.open(lease, routing_id, manifest.get("client") or {}, wanted_base=base,
                            session_id=manifest["session"], resume_token=resume_token)
        if session.base != base:
            self.end(session)
            raise TenancyError("StateLost", _lost(
                f"its address range {base:#x} is in use on this agent by another session, so its "
                "pointers could not stay valid here"))
        try:
            for call in manifest["log"]:
                name, args = P.validate_call(call)
                self.executor.run(session.ops[name], *args)
                session.record(name, args)
            chunks = [(addr, frames[i]) for i, (addr, _size) in enumerate(manifest["chunks"])]
            self.executor.run(session.device.restore, chunks)
        except (ExecutorError, P.ProtocolError, KeyError, IndexError, TypeError) as e:
            self.end(session)
            raise TenancyError("StateLost",
                               _lost(f"recreating it on this agent failed: {e}")) from None
        for addr, size in manifest["chunks"]:
            session.ranges.add(addr, size)
        log.info("session %s adopted from another agent", session.session_id)
        return session

    def manifest(self, session_id: str, resume_token: str) -> tuple[dict[str, Any], list[Any]]:
        """The parked state of a session, for another agent (``parked_fetch``)."""
        session = self.sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.resume_token, resume_token):
            reason = self.parking.dropped.get(session_id)
            raise TenancyError("StateLost", _lost(reason or "this agent does not have it"))
        parked = self.parking.get(session_id)
        if session.state != PARKED or parked is None:
            raise TenancyError("SessionError", f"session {session_id} is not parked")
        manifest = {"session": session_id, "kernel_id": session.kernel_id,
                    "range": [session.base, session.size], "client": session.client,
                    "log": session.replay_calls(),
                    "chunks": [[c.addr, c.size] for c in parked.chunks]}
        return manifest, [c.read() for c in parked.chunks]

    def park(self, session: ClientSession, why: str) -> int:
        """Park an active session: its memory to the ParkStore, the GPU's memory freed. Returns
        the parked bytes. If its memory cannot be kept, it is dropped (StateLost later)."""
        if session.state != ACTIVE:
            return 0
        try:
            chunks = self.executor.run(session.device.park)
            parked, evicted = self.parking.put(session.session_id, chunks,
                                               ttl=session.park_ttl, limit=session.park_limit)
        except (ExecutorError, MemoryError, OSError) as e:
            log.error("could not park session %s: %s", session.session_id, e)
            self.parking.dropped[session.session_id] = f"parking it failed: {e}"
            self.end(session)
            return 0
        for other in evicted:
            self._forget(other)
        session.state = PARKED
        session.lease_id = None
        log.info("session %s parked (%d bytes, %d spilled): %s", session.session_id,
                 parked.nbytes, parked.spilled_bytes, why)
        return parked.nbytes

    def end(self, session: ClientSession) -> None:
        self.sessions.pop(session.session_id, None)
        self.parking.drop(session.session_id, "its session ended")
        self.parking.dropped.pop(session.session_id, None)
        try:
            session.device.close()
        except Exception:
            log.exception("closing session %s", session.session_id)
        log.info("session %s closed", session.session_id)

    def drop_kernel(self, header: dict[str, Any]) -> tuple[int, int]:
        """``drop_parked``: forget every session of a kernel; (sessions, bytes)."""
        kernel_id, secret = header.get("kernel_id"), header.get("kernel_secret")
        known = self._kernel_secrets.get(kernel_id) if isinstance(kernel_id, str) else None
        if known is None:
            return 0, 0
        if not (isinstance(secret, str) and secrets.compare_digest(known, secret)):
            raise TenancyError("LeaseError", "wrong kernel_secret: refused")
        count = nbytes = 0
        for session in [s for s in self.sessions.values() if s.kernel_id == kernel_id]:
            parked = self.parking.get(session.session_id)
            nbytes += parked.nbytes if parked else session.device.device_bytes()
            count += 1
            self.end(session)
        if not any(lease.kernel_id == kernel_id for lease in self._active_leases()):
            self._kernel_secrets.pop(kernel_id, None)
        return count, nbytes

    def forget_moved(self, session_id: str, resume_token: str) -> int:
        session = self.sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.resume_token, resume_token):
            return 0
        parked = self.parking.get(session_id)
        nbytes = parked.nbytes if parked else 0
        self.end(session)
        self.parking.dropped[session_id] = MOVED
        return nbytes

    def _forget(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            try:
                session.device.close()
            except Exception:
                log.exception("closing session %s", session_id)

    def _active_leases(self) -> list[Lease]:
        return [*([self.leases.holder] if self.leases.holder else []), *self.leases.queue]

    def _free_slot(self, wanted_base: int | None) -> int:
        used = {s.slot for s in self.sessions.values()}
        if wanted_base is not None:
            slot, rem = divmod(wanted_base - P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
            if rem == 0 and 0 <= slot < MAX_SESSIONS and slot not in used:
                return slot
        free = [slot for slot in range(MAX_SESSIONS) if slot not in used]
        if not free:
            raise TenancyError("SessionError", f"this agent already keeps {MAX_SESSIONS} sessions")
        # a random slot makes it unlikely that a session moving here from another agent finds
        # its address range taken
        return free[secrets.randbelow(len(free))]

    # }}}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        holder = self.leases.holder
        return {
            "ttl": self.leases.ttl,
            "holder": None if holder is None else {
                "lease_id": holder.lease_id, "kernel_id": holder.kernel_id, "user": holder.user,
                "since": _wall(holder.granted_at), "info": holder.info,
                "session_bytes": sum(s.device.device_bytes()
                                     for s in self.sessions_of(holder.kernel_id, ACTIVE)),
            },
            "queue": [{"lease_id": q.lease_id, "kernel_id": q.kernel_id, "user": q.user,
                       "position": i + 1, "waiting_s": round(now - q.requested_at, 3),
                       "info": q.info}
                      for i, q in enumerate(self.leases.queue)],
            "parked": [{"session": s.session_id, "kernel_id": s.kernel_id,
                        "bytes": p.nbytes, "spilled_bytes": p.spilled_bytes,
                        "parked_s": round(now - p.parked_at, 3)}
                       for s in self.sessions.values() if s.state == PARKED
                       if (p := self.parking.get(s.session_id)) is not None],
        }

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._forget(session.session_id)
        self.parking.close()


def _take_park_policy(session: ClientSession, lease: Lease) -> None:
    """The kernel's park_ttl and park_limit from its lease info (positive numbers, else none)."""
    info = lease.info if isinstance(lease.info, dict) else {}
    ttl, limit = info.get("park_ttl"), info.get("park_limit")
    session.park_ttl = float(ttl) if type(ttl) in (int, float) and ttl > 0 else None
    session.park_limit = int(limit) if type(limit) in (int, float) and limit > 0 else None


def _wall(monotonic_at: float | None, clock: Callable[[], float] = time.monotonic) -> float | None:
    if monotonic_at is None:
        return None
    return time.time() - (clock() - monotonic_at)


def _lost(reason: str) -> str:
    return (f"the parked GPU state of this kernel is gone: {reason}. Its device arrays, modules "
            "and streams no longer exist: re-run the cells that create them.")
