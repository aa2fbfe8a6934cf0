"""A client's side of the encrypted wire: CurveZMQ keys for sockets to GPU agents.

Set ``HARP_CURVE_SERVER_KEY_FILE`` (the agents' public certificate, ``server.key``) and
``HARP_CURVE_CLIENT_KEY_FILE`` (this client's certificate with its secret, ``client.key_secret``,
whose public half is in the agents' ``--curve-client-keys-dir``). With neither set the wire is
plain (fine on loopback or a trusted network); with one but not the other, or a file that holds
no key, ``WireKeyError`` says which. The kernel's shim and the provisioner's lease client both
use this, so one setting covers every socket a kernel opens to an agent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth

SERVER_KEY_ENV = "HARP_CURVE_SERVER_KEY_FILE"
CLIENT_KEY_ENV = "HARP_CURVE_CLIENT_KEY_FILE"


class WireKeyError(ValueError):
    """The CurveZMQ settings are incomplete or a key file is not usable."""


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` (before it connects) a CurveZMQ client of the agents."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def client_keys(environ: dict[str, str] | None = None) -> ClientKeys | None:
    """The keys the environment names, None for a plain wire; WireKeyError when half set."""
    env = os.environ if environ is None else environ
    server_file, client_file = env.get(SERVER_KEY_ENV, ""), env.get(CLIENT_KEY_ENV, "")
    if not server_file and not client_file:
        return None
    if not (server_file and client_file):
        missing = SERVER_KEY_ENV if not server_file else CLIENT_KEY_ENV
        raise WireKeyError(f"CurveZMQ needs both {SERVER_KEY_ENV} and {CLIENT_KEY_ENV}: "
                           f"{missing} is not set")
    try:
        server_public, _ = zmq.auth.load_certificate(server_file)
        public, secret = zmq.auth.load_certificate(client_file)
    except (OSError, ValueError) as e:
        raise WireKeyError(f"cannot read a CurveZMQ key ({SERVER_KEY_ENV}={server_file}, "
                           f"{CLIENT_KEY_ENV}={client_file}): {e}") from None
    if secret is None:
        raise WireKeyError(f"{CLIENT_KEY_ENV}={client_file} holds no secret key: give the "
                           "client's *.key_secret file")
    return ClientKeys(server_public, public, secret)
