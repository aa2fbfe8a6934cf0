"""Calls on their way when the agent parked a session by itself (reclaimed for a waiting kernel,
its lease expired or ended): which of them ran, which are sent again after the restore, and the
error for those whose fate cannot be made good.

A worker reads its supervisor before each batch and never stops one that runs, so its park
captures the session after some batch and before the next: every batch it ran is in the parked
state, no other is. The agent says how many it ran (``batches`` in its ``lost``/``parked``
notice), so the client knows, without guessing, which of its unanswered batches did not run.
Those, and the calls it had not sent yet, are sent again in the same order once the session is
restored (``SessionParking.send_carried``): they run exactly once. When the agent parks the restored
session again while it sends them (another kernel waits), what its new writer took settles like any
orphan's calls and what it had not taken follows them at the next restore; a session parked
``RESTORE_PARKS`` times in a row while restoring gives up with an error naming the calls that did
not run (``SessionParking.give_up``). A batch that ran but whose reply
was lost with the worker, a batch whose buffers were the program's again once sent, and every
call when the agent's notice does not come within ``HARP_PARK_WAIT`` seconds cannot be made
good: they end in one ``LeaseLostError`` at the next sync point, never silently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpu_agent import protocol
from harp_jupyter.shim.batch import BatchWriter, CallMeta, PendingBatch
from harp_jupyter.shim.errors import LeaseLostError, describe_site
from harp_jupyter.shim.notice import in_kernel
from harp_jupyter.shim.transport import AgentConnection

#: how long a session whose lease the agent ended waits for the agent's word that its park is
#: done (it says which calls ran); a large session parks to disk at disk speed
DEFAULT_PARK_WAIT_S = 120.0
PARK_WAIT_ENV = "HARP_PARK_WAIT"


def park_wait_from_env() -> float:
    text = os.environ.get(PARK_WAIT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_PARK_WAIT_S
    except ValueError:
        raise ValueError(f"{PARK_WAIT_ENV} must be a number of seconds, not {text!r}") from None
    return value if value > 0 else DEFAULT_PARK_WAIT_S


@dataclass
class Orphan:
    """The writer and control connection of a session the agent parked by itself."""

    writer: BatchWriter
    connection: AgentConnection
    session: str
    #: the agent's ``lost`` notice about the session, once read
    notice: dict[str, Any] | None = None


@dataclass
class CarryOver:
    """What a restored session sends first, and what it reports at its next sync point."""

    resend: list[PendingBatch] = field(default_factory=list)
    dropped: list[CallMeta] = field(default_factory=list)
    error: LeaseLostError | None = None


def await_notice(connection: AgentConnection, session: str, timeout: float
                 ) -> dict[str, Any] | None:
    """The agent's ``lost`` notice about ``session`` (parked, or lost with its reason), as soon
    as it comes; None when the connection drops or ``timeout`` seconds pass first."""
    if connection.lost or connection.closed:
        return None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        pushed = connection.pushed(left)
        if pushed is None:
            return None
        if pushed.get("t") == protocol.LOST and pushed.get("session") in (session, None):
            return pushed
    return None


def carry_over(orphan: Orphan, timeout: float,
               later: Sequence[PendingBatch] = ()) -> CarryOver:
    """Settle an orphan: wait for the agent's notice (unless read already) and for the replies
    its worker sent before parking, then sort what is left (see the module docstring).
    ``later``: batches the orphan's restore had still to send again when it was parked too
    (they follow the orphan's own, never sent on its link)."""
    notice = orphan.notice or await_notice(orphan.connection, orphan.session, timeout)
    ran = notice.get("batches") if notice is not None and notice.get("parked") else None
    writer = orphan.writer
    sent = writer.answered_through() + writer.inflight
    if type(ran) is int:
        writer.receive_through(ran, timeout)
    left = writer.take_unanswered()
    pending = [*left.batches, *([left.queued] if left.queued.calls else []),
               *(replace(batch, seq=0) for batch in later)]
    carry = CarryOver()
    if not pending:
        return carry
    if type(ran) is not int or not 0 <= ran <= sent:
        why = ("the agent did not say within "
               f"{timeout:g} s ({PARK_WAIT_ENV}) which of them ran" if notice is None
               else "the agent could not say which of them ran")
        return _dropped(carry, pending, f"were on their way when the agent parked this "
                                        f"kernel's GPU session, and {why}")
    reply_lost = [b for b in pending if 0 < b.seq <= ran]
    to_run = [b for b in pending if b.seq == 0 or b.seq > ran]
    if reply_lost:
        _dropped(carry, reply_lost, "ran just before the agent parked this kernel's GPU "
                                    "session, but their replies were lost with its worker")
    for index, batch in enumerate(to_run):
        if not batch.replayable:
            _dropped(carry, to_run[index:], "did not run before the agent parked this "
                                            "kernel's GPU session, and cannot be sent again "
                                            "(their host buffers were the program's again "
                                            "once sent)")
            break
        carry.resend.append(batch)
    return carry


def _dropped(carry: CarryOver, batches: list[PendingBatch], what: str) -> CarryOver:
    metas = [meta for batch in batches for meta in batch.metas]
    carry.dropped.extend(metas)
    if carry.error is None and metas:
        op, site = metas[0][0], metas[0][1]
        where = describe_site(op, site)
        carry.error = LeaseLostError(
            f"{len(metas)} GPU call{'s' if len(metas) > 1 else ''} {what}: their effects on "
            "device memory and their results are not known. The device memory is as it was "
            f"when the session was parked; re-run the {'cell' if in_kernel() else 'code'} "
            "that made these calls."
            + (f"\n  the first: {where}" if where else ""))
    return carry
