"""``harp-agent``: serve one GPU (or an emulated one) to HARP clients over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from gpu_agent.executors import gpu_available, make_executor
from gpu_agent.server import AgentServer

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512M"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8GiB or 512MiB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


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
        server = AgentServer(executor, args.listen, token=args.token)
    except Exception as e:
        print(f"harp-agent: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    device = executor.device_info()["name"]
    note = " [EMULATED: host memory, no GPU]" if executor.emulated else ""
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
