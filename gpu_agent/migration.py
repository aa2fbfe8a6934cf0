"""Moving parked state between agents: this agent asks the one that holds it.

A kernel whose parked state sits on agent A may be granted agent B. B then asks A for the state
(``parked_fetch``), recreates the session and, once it runs, tells A to forget it
(``parked_forget``). Agent to agent, the bytes never pass through the notebook's machine.
"""

from __future__ import annotations

from typing import Any

import zmq

from gpu_agent import protocol as P

FETCH_TIMEOUT_S = 120.0


class MigrationError(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def _request(endpoint: str, header: dict[str, Any], timeout: float) -> tuple[dict, list[Any]]:
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(P.pack_header(header))
        if not socket.poll(int(timeout * 1000)):
            raise MigrationError("StateLost", f"the agent at {endpoint} that holds the parked "
                                 f"state did not answer within {timeout:g} s")
        reply, frames = P.decode(socket.recv_multipart(copy=False))
    except zmq.ZMQError as e:
        raise MigrationError("StateLost", f"cannot reach the agent at {endpoint}: {e}") from None
    except P.ProtocolError as e:
        raise MigrationError("StateLost",
                             f"the agent at {endpoint} answered garbage: {e}") from None
    finally:
        socket.close(0)
    if reply.get("t") == P.ERROR:
        e = reply.get("e") or {}
        raise MigrationError(e.get("kind", "StateLost"), str(e.get("msg")))
    return reply, frames


def fetch_parked(endpoint: str, session: str, resume_token: str, token: str | None,
                 timeout: float = FETCH_TIMEOUT_S) -> tuple[dict[str, Any], list[Any]]:
    """The manifest and chunk frames of a session parked at ``endpoint``."""
    reply, frames = _request(endpoint, {"t": P.PARKED_FETCH, "rid": 1, "session": session,
                                        "resume_token": resume_token, "token": token}, timeout)
    manifest = reply.get("manifest")
    if reply.get("t") != P.PARKED_STATE or not isinstance(manifest, dict):
        raise MigrationError("StateLost", f"unexpected answer from {endpoint}: {reply.get('t')}")
    if len(manifest.get("chunks", [])) != len(frames):
        raise MigrationError("StateLost", f"{endpoint} sent {len(frames)} chunks, the manifest "
                             f"names {len(manifest.get('chunks', []))}")
    return manifest, [f.buffer for f in frames]


def forget_parked(endpoint: str, session: str, resume_token: str, token: str | None,
                  timeout: float = 10.0) -> None:
    _request(endpoint, {"t": P.PARKED_FORGET, "rid": 1, "session": session,
                        "resume_token": resume_token, "token": token}, timeout)
