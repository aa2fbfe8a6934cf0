"""Receiving and sending one multipart ZeroMQ message in as few Python steps as the hot path
can afford: a synchronous GPU call is one such message each way, and pyzmq's general-purpose
``recv_multipart``/``send_multipart`` spend more CPU on a small message than ZeroMQ itself
(a socket option read per frame, flag enums combined per frame, a buffer check of every part).

``receive`` reads frames as long as the last one says more follow; ``send`` copies small
``bytes`` frames (cheaper than ZeroMQ's zero-copy bookkeeping) and hands every other buffer to
ZeroMQ zero-copy. Both raise as the pyzmq calls do (``zmq.Again`` past a time limit or with
``NOBLOCK``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: a bytes frame smaller than this is copied into ZeroMQ's message (pyzmq's own threshold)
_COPY_BELOW = zmq.COPY_THRESHOLD


def receive(socket: zmq.Socket) -> list[zmq.Frame]:
    """The next message's frames (zero-copy)."""
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
        copy = type(part) is bytes and len(part) < _COPY_BELOW
        socket.send(part, more if i < last else flags, copy=copy)
