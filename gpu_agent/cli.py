"""``harp-agent``: serve one GPU (or an emulated one) to HARP clients over ZeroMQ.

The process that runs this is the supervisor (gpu_agent/supervisor.py); it starts one worker
process per session (gpu_agent/worker.py). Every bound of gpu_agent/limits.py is a flag here.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

from gpu_agent import multipart, nvcc_limits
from gpu_agent.curve import ServerKeys
from gpu_agent.executors import gpu_available
from gpu_agent.limits import AgentLimits
from gpu_agent.pool_names import checked_pool, expand_endpoints
from gpu_agent.sizes import format_bytes
from gpu_agent.supervisor import Supervisor
from gpu_agent.workers import WorkerConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: device memory a worker's CUDA context and pycuda's modules take (seen on an H200: ~0.5 GiB)
CONTEXT_BYTES = 768 << 20


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512M"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8GiB or 512MiB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def parse_bytes_or_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return float(parse_bytes(text))
    if not 0 < value:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def busy_poll_us(text: str) -> int:
    value = int(text)
    if not 0 <= value <= multipart.MAX_BUSY_POLL_US:
        raise argparse.ArgumentTypeError(
            f"not a number of microseconds from 0 to {multipart.MAX_BUSY_POLL_US}: {text!r}")
    return value


def _bound_type(name: str, unit: str) -> Any:
    if name == "slot_memory":
        return parse_bytes_or_fraction
    if unit == "bytes":
        return parse_bytes
    if unit == "seconds":
        return positive_seconds
    if name in ("park_memory_dir", "park_dir"):
        return str
    return int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harp-agent", description="Serve one GPU to HARP for Jupyter kernels.")
    parser.add_argument("--listen", required=True, metavar="tcp://HOST:PORT",
                        help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5555 (port 0: any "
                             "free port, printed at start)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument("--executor", choices=["pycuda", "emulated"], default=None,
                        help="pycuda (a real GPU; the default when one is usable) or emulated "
                             "(host memory and NumPy, for machines without a GPU)")
    parser.add_argument("--token", default=None,
                        help="shared secret clients must present (HARP_TOKEN on their side; "
                             "the agent also reads HARP_TOKEN, which keeps it out of ps); "
                             "without it only a liveness probe is answered")
    parser.add_argument("--emulated-memory", type=parse_bytes, default=4 << 30,
                        help="device memory the emulated executor pretends to have (4GiB)")
    parser.add_argument("--worker-host", default=None, metavar="HOST",
                        help="address workers bind for their sessions' data connections "
                             "(default: the --listen host)")
    parser.add_argument("--worker-ports", default=None, metavar="A-B",
                        help="port range workers bind in (for firewalls and NetworkPolicies; "
                             "default: any free port)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus /metrics and the /healthz and /readyz probes on "
                             "this port (0: any free port, printed at start); none by default")
    parser.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                        help="address the metrics port binds (0.0.0.0)")
    parser.add_argument("--worker-advertise", default=None, metavar="HOST",
                        help="the host clients reach workers at, when it is not the one they "
                             "bind (NAT, a relay); default: the bind host, or the host the "
                             "client reached the agent at when workers bind every interface")
    parser.add_argument("--curve-secret-key-file", default=None, metavar="FILE",
                        help="encrypt and authenticate the wire with CurveZMQ: this agent's "
                             "certificate (python -m gpu_agent.curve generate DIR makes one)")
    parser.add_argument("--curve-client-keys-dir", default=None, metavar="DIR",
                        help="public keys (*.key) of the clients admitted; re-read every 10 s")
    parser.add_argument("--pool", default=None, metavar="tcp://NAME:PORT[,...]",
                        help="the agents of this pool (a name may resolve to several addresses: "
                             "a headless Service); a draining agent (SIGTERM) hands its parked "
                             "state to them. None by default: parked state ends with the agent")
    parser.add_argument("--advertise", default=None, metavar="tcp://HOST:PORT",
                        help="this agent's endpoint as the pool's other agents reach it (to "
                             "fetch parked state from it); default: the --listen endpoint, with "
                             "the --worker-advertise or --worker-host host when it binds all")
    parser.add_argument("--spares", type=int, default=1,
                        help="workers kept ready (CUDA context created) for the next session")
    parser.add_argument("--busy-poll-us", type=busy_poll_us,
                        default=multipart.default_busy_poll_us(), metavar="US",
                        help="how long a worker polls for its client's next message without "
                             "sleeping, after each reply: a sync loop's round trip then skips "
                             "a wake-up, for at most this much CPU per reply; 0 turns it off "
                             f"(default {multipart.BUSY_POLL_US} where this machine or "
                             f"container has {multipart.BUSY_POLL_MIN_CPUS} CPUs or more, "
                             "else 0)")
    group = parser.add_argument_group("bounds (each crossing is a clear error to that client)")
    defaults = AgentLimits()
    for name, spec in AgentLimits.flags():
        meta = spec.metadata
        default = getattr(defaults, name)
        shown = "derived from this machine" if default is None else default
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                           type=_bound_type(name, meta["unit"]), metavar=meta["metavar"],
                           help=f"{meta['help']} (default: {shown})")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="the only directory tree notebooks may load files from "
                             "(harp_jupyter.remote); none by default")
    parser.add_argument("--data-writable", action="store_true",
                        help="also let notebooks save device arrays into --data-root")
    parser.add_argument("--data-reader", choices=["auto", "kvikio", "pipeline"], default="auto",
                        help="how files reach device memory: auto (GPUDirect Storage through "
                             "kvikio where it works, else pipelined pinned reads), or force one")
    parser.add_argument("--client-cuda-source", choices=nvcc_limits.MODES,
                        default=nvcc_limits.SANDBOXED,
                        help="CUDA C that clients send (SourceModule, ElementwiseKernel, ...): "
                             "sandboxed (nvcc under Linux Landlock, refused where the kernel "
                             "has none; the default), refuse, or unsafe-unsandboxed (nvcc may "
                             "read every file this agent can: only for trusted clients)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (INFO)")
    return parser


def _device_facts(executor: str, device: int, emulated_memory: int) -> dict[str, Any]:
    """The device's name and memory, read without a CUDA context (the supervisor makes none)."""
    if executor == "emulated":
        from gpu_agent.executors.emulated import DEVICE_NAME

        return {"name": DEVICE_NAME, "total_memory": emulated_memory, "emulated": True}
    import pycuda.driver as cuda

    cuda.init()
    gpu = cuda.Device(device)
    return {"name": gpu.name(), "total_memory": int(gpu.total_memory()), "emulated": False,
            "pci_bus_id": gpu.pci_bus_id()}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s harp-agent %(levelname)s %(message)s")
    executor = args.executor
    if executor is None:
        reason = gpu_available(args.device)
        if reason is not None:
            print(f"harp-agent: no usable GPU ({reason}): using the EMULATED executor",
                  flush=True)
            executor = "emulated"
        else:
            executor = "pycuda"
    limits = AgentLimits(**{name: getattr(args, name) for name, _ in AgentLimits.flags()})
    try:
        facts = _device_facts(executor, args.device, args.emulated_memory)
        context_bytes = 0 if executor == "emulated" else CONTEXT_BYTES
        memory_cap = limits.slot_bytes(facts["total_memory"], context_bytes)
        host = args.worker_host or urlsplit(args.listen.replace("*", "0.0.0.0")).hostname
        config = WorkerConfig(
            executor=executor, device=args.device, bind_host=host or "127.0.0.1",
            memory_cap=memory_cap, max_frame=limits.max_frame,
            unread_replies=limits.unread_replies, fetch_timeout=limits.fetch_timeout,
            pinned_staging=limits.pinned_staging, busy_poll_us=args.busy_poll_us,
            session_objects=limits.session_objects,
            pending_gpu_timings=limits.pending_gpu_timings,
            ports=args.worker_ports, data_root=args.data_root,
            data_writable=args.data_writable, data_reader=args.data_reader,
            advertise_host=args.worker_advertise,
            nvcc=nvcc_limits.NvccPolicy(args.client_cuda_source, limits.nvcc_cpu,
                                        limits.nvcc_memory, limits.nvcc_wall).to_arg(),
            curve_secret_file=args.curve_secret_key_file,
            curve_clients_dir=args.curve_client_keys_dir,
            log_level="WARNING" if args.log_level.upper() == "INFO" else args.log_level)
        curve = ServerKeys.load(args.curve_secret_key_file, args.curve_client_keys_dir) \
            if args.curve_secret_key_file else None
        pool = checked_pool(args.pool) if args.pool else []
        supervisor = Supervisor(args.listen, config, limits, token=args.token or
                                os.environ.get("HARP_TOKEN") or None, device=facts,
                                spares=args.spares, curve=curve,
                                pool=lambda: expand_endpoints(pool), advertise=args.advertise)
        if supervisor.drain.advertise.startswith(("tcp://0.0.0.0:", "tcp://[::]:")):
            port = supervisor.endpoint.rsplit(":", 1)[1]
            named = args.worker_advertise or host
            if named in ("0.0.0.0", "::", "*"):
                named = socket.gethostbyname(socket.gethostname())
            supervisor.drain.advertise = f"tcp://{named}:{port}"
        if args.metrics_port is not None:
            port = supervisor.serve_metrics(args.metrics_host, args.metrics_port)
            print(f"harp-agent: metrics on http://{args.metrics_host}:{port}/metrics "
                  "(/healthz, /readyz)", flush=True)
        supervisor.wait_ready(limits.worker_start_timeout)
    except Exception as e:
        print(f"harp-agent: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    note = " [EMULATED: host memory, no GPU]" if executor == "emulated" else ""
    if args.data_root is not None:
        access = "read-write" if args.data_writable else "read-only"
        print(f"harp-agent: data root {args.data_root} ({access})", flush=True)
    memory, limit = limits.park_budget()
    if args.token is None and not os.environ.get("HARP_TOKEN") and not _loopback(args.listen):
        print("harp-agent: WARNING: no --token and listening beyond loopback: anyone who can "
              "reach this port can use the GPU", flush=True)
    if args.client_cuda_source == nvcc_limits.UNSAFE:
        print(f"harp-agent: WARNING: {nvcc_limits.UNSAFE_WARNING}", flush=True)
    elif args.client_cuda_source == nvcc_limits.REFUSE:
        print("harp-agent: CUDA C from clients is refused (--client-cuda-source refuse)",
              flush=True)
    if curve is None:
        print("harp-agent: the wire is NOT encrypted (no --curve-secret-key-file)"
              + ("" if _loopback(args.listen) else ": tokens and data cross the network in "
                 "clear"), flush=True)
    else:
        print(f"harp-agent: CurveZMQ encryption on; clients admitted from "
              f"{args.curve_client_keys_dir or '(no directory: agents of this pool only)'}",
              flush=True)
    print(f"harp-agent: {limits.slots} slot(s) of {format_bytes(memory_cap)}; parked state up "
          f"to {format_bytes(memory)} in host memory, {format_bytes(limit)} in all", flush=True)
    print(f"harp-agent: on SIGTERM it drains for up to {limits.drain_grace:g} s; parked state "
          f"moves to {args.pool or 'no other agent (no --pool)'}", flush=True)
    print(f"harp-agent: serving {supervisor.endpoint} executor={executor} "
          f"device={facts['name']}{note}", flush=True)
    supervisor.serve_forever()


def _loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or endpoint.startswith(("ipc:", "inproc:"))


if __name__ == "__main__":
    main()
