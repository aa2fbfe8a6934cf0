"""The worker's KernelOutput (fd 1 into a pipe, carried with the next reply), in a child process
of its own since it takes over fd 1: what C's stdio printed before a reply (still in stdio's
buffer, or already in the pipe) comes with that reply, nothing is repeated, and an empty pipe
gives an empty string."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, json, os, sys
from gpu_agent.worker import KernelOutput

libc = ctypes.CDLL(None)
output = KernelOutput()
seen = [output.take()]
libc.printf(b"buffered in stdio\n")          # fd 1 is a pipe: C's stdout is unbuffered now
seen.append(output.take())
libc.printf(b"no flush")                     # no newline: a buffered stream would keep it
seen.append(output.take())
os.write(1, b"straight into the pipe\n")
seen.append(output.take())
seen.append(output.take())
sys.stderr.write(json.dumps(seen))
"""


def test_output_printed_before_a_reply_comes_with_it_once() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stderr) == ["", "buffered in stdio\n", "no flush",
                                        "straight into the pipe\n", ""]
