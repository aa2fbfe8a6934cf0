"""The "Elastic GPU" kernelspec: an IPython kernel whose pycuda imports go to a GPU agent.

``python -m harp_jupyter.kernelspec install [--user | --sys-prefix] [--agent tcp://HOST:PORT]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "elastic-gpu"
DISPLAY_NAME = "Elastic GPU"


def kernel_json(agent: str | None) -> dict:
    env = {"HARP_SHIM": "1"}
    if agent:
        env["HARP_AGENT"] = agent
    return {
        "argv": [sys.executable, "-m", "harp_jupyter.kernel_launcher", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "env": env,
        "metadata": {"debugger": False, "harp": {"agent": agent}},
    }


def install(agent: str | None, *, user: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec; returns the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernel_json(agent), indent=2))
        return KernelSpecManager().install_kernel_spec(
            tmp, KERNEL_NAME, user=user, prefix=prefix)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harp_jupyter.kernelspec")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install the Elastic GPU kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python environment")
    inst.add_argument("--agent", help="GPU agent endpoint, tcp://HOST:PORT (else HARP_AGENT)")
    args = parser.parse_args(argv)
    path = install(args.agent, user=args.user, prefix=sys.prefix if args.sys_prefix else None)
    print(f"harp: installed kernelspec {KERNEL_NAME!r} ({DISPLAY_NAME}) in {path}")


if __name__ == "__main__":
    main()
