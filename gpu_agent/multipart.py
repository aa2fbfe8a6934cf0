"""Receiving and sending one multipart ZeroMQ message in as few Python steps as the hot path
can afford: a synchronous GPU call is one such message each way, and pyzmq's general-purpose
``recv_multipart``/``send_multipart`` spend more CPU on a small message than ZeroMQ itself
(a socket option read per frame, flag enums combined per frame, a buffer check of every part).

``receive`` reads frames as long as the last one says more follow (after busy-polling the socket
for up to ``busy_poll_ns``, when given: a thread blocked in ZeroMQ is woken by the kernel, which on
a virtual machine costs more than the whole Python side of a small reply); ``send`` copies frames
under ``COPY_BELOW_BYTES`` into ZeroMQ's own messages and hands larger buffers to ZeroMQ
zero-copy. A zero-copy frame is released by pyzmq's garbage-collector thread, a Python thread
that needs the GIL once ZeroMQ has sent it: behind a thread that busy-polls with the GIL held it
waits for the switch interval, and takes its turn in the middle of a later call. Both raise as
the pyzmq calls do (``zmq.Again`` past a time limit or with
``NOBLOCK``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import zmq

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: a frame smaller than this is copied into ZeroMQ's message, which covers the pieces of a 1-2 MiB
#: copy (harp_jupyter.shim.session.copy_pieces). Without busy polling a copied 256 KiB-1 MiB frame
#: made a slower round trip than a zero-copy one (bench/results/copy-pipeline-nvidia-h200.md), but
#: through the shim, where both sides poll, copying frames up to 1 MiB took a 1 MiB download from
#: 484-523 to 392-408 µs (p50) and an upload from 408-475 to 401-404, with fewer wake-ups of the
#: sender's threads (bench/op_costs.py, H200, two interleaved pairs of runs, 2026-12-02)
COPY_BELOW_BYTES = 1 << 20
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: the longest busy poll a flag may ask for: past a millisecond it only burns CPU
MAX_BUSY_POLL_US = 1000
#: the busy poll where the machine has room for it: a small sync call's reply, or a sync loop's
#: next request, comes within ~100-150 µs on an H200 host (bench/results/busy-poll-*.md)
BUSY_POLL_US = 200
#: fewer CPUs than this and a polling thread takes the core the other side's threads need (on
#: 2 CPUs a sync read took 2.5x as long polling as sleeping)
BUSY_POLL_MIN_CPUS = 8


def usable_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> float:
    """CPUs this process may use: its affinity, and a cgroup v2 quota (a container's CPU limit)
    where there is one."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = open(cgroup_cpu_max).read().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


def default_busy_poll_us() -> int:
    """``BUSY_POLL_US`` where at least ``BUSY_POLL_MIN_CPUS`` CPUs are usable, else 0."""
    return BUSY_POLL_US if usable_cpus() >= BUSY_POLL_MIN_CPUS else 0


def busy_poll(socket: zmq.Socket, busy_poll_ns: int) -> bool:
    """Whether a message arrived within ``busy_poll_ns`` of polling without sleeping."""
    events, clock = socket.getsockopt, time.perf_counter_ns
    deadline = clock() + busy_poll_ns
    while not events(_EVENTS) & _POLLIN:
        if clock() > deadline:
            return False
    return True


def receive(socket: zmq.Socket, busy_poll_ns: int = 0) -> list[zmq.Frame]:
    """The next message's frames (zero-copy), busy-polling up to ``busy_poll_ns`` first."""
    if busy_poll_ns:
        busy_poll(socket, busy_poll_ns)
    frame = socket.recv(copy=False)
    parts = [frame]
    while frame.more:
        frame = socket.recv(copy=False)
        parts.append(frame)
    return parts


def send(socket: zmq.Socket, parts: Sequence[Any], flags: int = 0) -> None:
    """Send ``parts`` as one message (each a bytes, a buffer or a ``zmq.Frame``)."""
    last = len(parts) - 1
    more = flags | _SNDMORE
    for i, part in enumerate(parts):
        if type(part) is bytes:
            copy = len(part) < COPY_BELOW_BYTES
        else:
            copy = not isinstance(part, zmq.Frame) and memoryview(part).nbytes < COPY_BELOW_BYTES
        socket.send(part, more if i < last else flags, copy=copy)
