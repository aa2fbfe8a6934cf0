"""The agent's side of an encrypted, authenticated wire: CurveZMQ with ZAP.

An agent that is given a server certificate (``--curve-secret-key-file``, a ``zmq.auth``
certificate file holding the public and the secret key) encrypts every socket that can cross
machines: the supervisor's, every worker's, and its own requests to other agents when parked state
moves. A client is let in only when its public key is in ``--curve-client-keys-dir`` (``*.key``
certificate files, read again every ``RELOAD_S`` seconds, so adding a key to a Kubernetes Secret
admits it without a restart) or is the agent's own key (agents of one pool share a key pair and
fetch parked state from each other). A client with a wrong or missing key never gets a session:
ZAP refuses its handshake, and the agent logs which key it refused.

    python -m gpu_agent.curve generate DIR    # server.key(_secret) and client.key(_secret)
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("harp.agent.curve")

RELOAD_S = 10.0


@dataclass(frozen=True)
class ServerKeys:
    """The agent's certificate and where the keys of the clients it admits are."""

    public: bytes
    secret: bytes
    clients_dir: Path | None
    secret_file: str

    @classmethod
    def load(cls, secret_file: str, clients_dir: str | None) -> ServerKeys:
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key: give the *.key_secret file")
        if clients_dir is not None and not Path(clients_dir).is_dir():
            raise ValueError(f"--curve-client-keys-dir {clients_dir} is not a directory")
        return cls(public, secret, Path(clients_dir) if clients_dir else None, secret_file)


class AdmittedKeys:
    """ZAP's question "may this key in?", answered from the client keys directory (re-read
    when older than ``RELOAD_S``) and the agent's own key."""

    def __init__(self, keys: ServerKeys) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._admitted: set[bytes] = set()
        self._read_at = 0.0

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            if time.monotonic() - self._read_at > RELOAD_S:
                self._admitted = self._read()
                self._read_at = time.monotonic()
            admitted = self._admitted
        allowed = key in admitted or key == self._keys.public
        if not allowed:
            log.warning("refused a CurveZMQ client key not in --curve-client-keys-dir: %s",
                        zmq.utils.z85.encode(key).decode())
        return allowed

    def _read(self) -> set[bytes]:
        directory = self._keys.clients_dir
        if directory is None:
            return set()
        keys = set()
        for path in sorted(directory.glob("*.key")):
            try:
                keys.add(zmq.auth.load_certificate(str(path))[0])
            except (OSError, ValueError) as e:
                log.warning("skipping client key %s: %s", path, e)
        return keys


def serve_encrypted(context: zmq.Context, sockets: list[zmq.Socket],
                    keys: ServerKeys) -> ThreadAuthenticator:
    """Make ``sockets`` (before they bind) CurveZMQ servers, admitted by ZAP; the
    authenticator (stop it at the end)."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", AdmittedKeys(keys))
    for socket in sockets:
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_server = True
    return authenticator


def connect_encrypted(socket: zmq.Socket, keys: ServerKeys) -> None:
    """An agent's own client socket to another agent of its pool (same key pair)."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.public


def generate(directory: str) -> list[Path]:
    """A server and a client certificate in ``directory``."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(str(target), name)
        made += [Path(public), Path(secret)]
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpu_agent.curve", description=(
        "CurveZMQ keys for harp-agent: the agent gets server.key_secret "
        "(--curve-secret-key-file), kernels get server.key (HARP_CURVE_SERVER_KEY_FILE) and "
        "client.key_secret (HARP_CURVE_CLIENT_KEY_FILE), and client.key goes into the agent's "
        "--curve-client-keys-dir."))
    parser.add_argument("command", choices=["generate"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    for path in generate(args.directory):
        print(path)


if __name__ == "__main__":
    main()
