"""``harp-agent``: serve one GPU (or an emulated one) to HARP clients over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from gpu_agent.datastore import DataStore
from gpu_agent.executors import gpu_available, make_executor
from gpu_agent.parking import ParkStore
from gpu_agent.server import AgentServer

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512M"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8GiB or 512MiB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _half_of_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harp-agent", description="Serve one GPU to HARP for Jupyter kernels.")
    parser.add_argument("--listen", required=True, metavar="tcp://HOST:PORT",
                        help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5555")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument("--executor", choices=["pycuda", "emulated"], default=None,
                        help="pycuda (a real GPU; the default when one is usable) or emulated "
                             "(host memory and NumPy, for machines without a GPU)")
    parser.add_argument("--token", default=None,
                        help="shared secret clients must present (HARP_TOKEN on their side)")
    parser.add_argument("--emulated-memory", type=parse_bytes, default=16 << 30,
                        help="device memory the emulated executor pretends to have (16GiB)")
    parser.add_argument("--lease-ttl", type=float, default=30.0, metavar="SECONDS",
                        help="a lease not renewed for this long expires; also the most a "
                             "lease request may ask for (30)")
    parser.add_argument("--park-memory", type=parse_bytes, default=None, metavar="BYTES",
                        help="host memory for parked sessions' device memory before spilling to "
                             "--park-dir (default: half of this machine's memory)")
    parser.add_argument("--park-dir", default=None, metavar="DIR",
                        help="where parked state spills past --park-memory (a temporary dir)")
    parser.add_argument("--park-limit", type=parse_bytes, default=None, metavar="BYTES",
                        help="all parked state, memory and disk; past it the oldest parked state "
                             "is dropped and its kernel told so (default: 4x --park-memory)")
    parser.add_argument("--park-ttl", type=float, default=86400.0, metavar="SECONDS",
                        help="parked state older than this is dropped (86400)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="the only directory tree notebooks may load files from "
                             "(harp_jupyter.remote); none by default")
    parser.add_argument("--data-writable", action="store_true",
                        help="also let notebooks save device arrays into --data-root")
    parser.add_argument("--data-reader", choices=["auto", "kvikio", "pipeline"], default="auto",
                        help="how files reach device memory: auto (GPUDirect Storage through "
                             "kvikio where it works, else pipelined pinned reads), or force one")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (INFO)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s harp-agent %(levelname)s %(message)s")
    executor_name = args.executor
    if executor_name is None:
        reason = gpu_available(args.device)
        if reason is not None:
            print(f"harp-agent: no usable GPU ({reason}): using the EMULATED executor",
                  flush=True)
            executor_name = "emulated"
    try:
        executor = make_executor(executor_name, args.device,
                                 emulated_memory=args.emulated_memory)
        if args.data_root is not None:
            executor.data_store = DataStore(args.data_root, writable=args.data_writable)
            executor.data_reader_choice = args.data_reader
            data = executor.data_status()
        park_memory = args.park_memory if args.park_memory is not None else _half_of_memory()
        parking = ParkStore(memory_cap=park_memory,
                            limit=args.park_limit if args.park_limit is not None
                            else 4 * park_memory,
                            ttl=args.park_ttl, spill_dir=args.park_dir)
        server = AgentServer(executor, args.listen, token=args.token, lease_ttl=args.lease_ttl,
                             parking=parking)
    except Exception as e:
        print(f"harp-agent: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    device = executor.device_info()["name"]
    note = " [EMULATED: host memory, no GPU]" if executor.emulated else ""
    if args.data_root is not None:
        access = "read-write" if data["writable"] else "read-only"
        print(f"harp-agent: data root {data['root']} ({access}), reader={data['reader']}: "
              f"{data['detail']}", flush=True)
    print(f"harp-agent: serving {server.endpoint} executor={executor.name} device={device}{note}",
          flush=True)
    server.serve_forever()
    if server.restart:
        # a fresh process is the only way back to a usable GPU after CUDA's sticky errors
        print("harp-agent: restarting after a fatal GPU error", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "gpu_agent.cli",
                                  *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
