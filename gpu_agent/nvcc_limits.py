"""What one nvcc run may cost, and the operator's choice of how clients' CUDA C is compiled.

A client's source is a program for the compiler: a template that instantiates itself
exponentially, or an unrolled loop of a billion iterations, makes nvcc (cudafe++, cicc, ptxas,
the host compiler) run for hours or take all the machine's memory. Each compile therefore runs
with limits (``NvccPolicy``: flags of harp-agent, gpu_agent/limits.py): CPU seconds and address
space for every process of it (setrlimit, inherited through nvcc's execs), a wall-clock limit
on the whole compile (its process group is killed), and its output kept to ``MAX_OUTPUT`` bytes
a stream. Crossing one ends that compile as a CompileError to that client, naming the limit and
the flag that raises it; the worker, and every other tenant, go on.

The launcher (``python -m gpu_agent.nvcc_sandbox``) runs ``run_limited`` after it restricted
itself with Landlock; the worker turns its exit (``LIMIT_EXIT``) into the client's error.
"""

from __future__ import annotations

import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from gpu_agent.errors import AgentError
from gpu_agent.sizes import format_bytes

#: how CUDA C from clients is compiled (harp-agent --client-cuda-source)
SANDBOXED, REFUSE, UNSAFE = "sandboxed", "refuse", "unsafe-unsandboxed"
MODES = (SANDBOXED, REFUSE, UNSAFE)

#: the launcher's exit status when a compile crossed a limit (its last stderr line says which)
LIMIT_EXIT = 86
LIMIT_MARK = "harp-nvcc-limit: "
#: bytes of each of the compile's output streams kept (a template's errors can run to gigabytes)
MAX_OUTPUT = 1 << 20

UNSAFE_WARNING = (
    "--client-cuda-source unsafe-unsandboxed: nvcc compiles CUDA C that clients send WITHOUT "
    "the Landlock sandbox: a source's #include can read any file this agent's user can read "
    "(its token, keys, other tenants' parked state) and send it back in a compile error. Use it "
    "only where every client is trusted with this machine's files")
REFUSED = (
    "this GPU agent's operator does not let clients compile CUDA C (harp-agent "
    "--client-cuda-source refuse): SourceModule, DynamicModule, ElementwiseKernel, "
    "ReductionKernel and scan expressions are refused. Array operations, cuRAND generators and "
    "module images (cubin/PTX you compiled) still work")


@dataclass(frozen=True)
class NvccPolicy:
    """How clients' CUDA C is compiled and what each compile (the agent's own too) may cost."""

    mode: str = SANDBOXED
    cpu_seconds: float = 300.0
    memory: int = 8 << 30
    wall_seconds: float = 300.0

    def to_arg(self) -> str:
        return f"{self.mode},{self.cpu_seconds:g},{self.memory},{self.wall_seconds:g}"

    @classmethod
    def parse(cls, text: str) -> NvccPolicy:
        mode, cpu, memory, wall = text.split(",")
        if mode not in MODES:
            raise ValueError(f"unknown nvcc mode {mode!r} (one of {', '.join(MODES)})")
        return cls(mode, float(cpu), int(memory), float(wall))


DEFAULT_POLICY = NvccPolicy()


def _limit_child(cpu_seconds: float, memory: int) -> None:
    # SIGXCPU at the soft limit (nvcc's processes do not catch it), SIGKILL a second later
    cpu = max(math.ceil(cpu_seconds), 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def run_limited(command: list[str], policy: NvccPolicy) -> int:
    """Run ``command`` (nvcc) under ``policy``'s limits, its output relayed (``MAX_OUTPUT`` of
    each stream); its exit status, or ``LIMIT_EXIT`` with the limit named on stderr."""
    started = time.monotonic()
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: _limit_child(policy.cpu_seconds, policy.memory))
    assert child.stdout is not None and child.stderr is not None
    relay = {child.stdout: (sys.stdout.buffer, [0]), child.stderr: (sys.stderr.buffer, [0])}
    selector = selectors.DefaultSelector()
    for stream in relay:
        selector.register(stream, selectors.EVENT_READ)
    deadline = started + policy.wall_seconds
    timed_out = False
    tail = bytearray()  # the end of stderr, where compilers say they ran out of memory
    while selector.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in selector.select(left):
            stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
            data = os.read(stream.fileno(), 1 << 16)
            if not data:
                selector.unregister(stream)
                continue
            out, written = relay[stream]
            keep = data[:max(MAX_OUTPUT - written[0], 0)]
            out.write(keep)
            written[0] += len(data)
            if stream is child.stderr:
                tail = (tail + data)[-4096:]
    if not timed_out:
        try:  # its output is closed; nvcc itself may still be finishing
            child.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:  # nvcc is not reaped yet, so its process group is still the compile's
        os.killpg(child.pid, signal.SIGKILL)
    status = child.wait()
    for out, written in relay.values():
        if written[0] > MAX_OUTPUT:
            out.write(f"\n[harp: {format_bytes(written[0] - MAX_OUTPUT)} more of nvcc's output "
                      "not shown]\n".encode())
        out.flush()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of it, reaped
    reason = _which_limit(status, timed_out, usage.ru_utime + usage.ru_stime, bytes(tail),
                          policy)
    if reason is None:
        return status if status >= 0 else 128 - status
    sys.stderr.write(f"\n{LIMIT_MARK}{reason}\n")
    sys.stderr.flush()
    return LIMIT_EXIT


#: how a compile ends when the kernel stopped one of its processes for CPU time: by the signal
#: itself, or nvcc's shell reporting it (128 + the signal)
_KILLED = {-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL}


def _which_limit(status: int, timed_out: bool, cpu_used: float, tail: bytes,
                 policy: NvccPolicy) -> str | None:
    if timed_out:
        return (f"the compile was stopped after {policy.wall_seconds:g} s of wall-clock time "
                "(harp-agent --nvcc-wall)")
    # the kernel's CPU accounting is in ticks: a process stopped at its limit may show a little
    # less than it
    if status in _KILLED and cpu_used >= 0.9 * math.ceil(policy.cpu_seconds):
        return (f"the compile was stopped after {policy.cpu_seconds:g} s of CPU time in one of "
                "its processes (harp-agent --nvcc-cpu)")
    text = tail.decode("utf-8", "replace").lower()
    if status != 0 and any(word in text for word in (
            "out of memory", "bad_alloc", "memory exhausted", "cannot allocate memory")):
        return (f"the compile ran out of the {format_bytes(policy.memory)} of memory each of its "
                "processes may use (harp-agent --nvcc-memory)")
    return None


def limit_error(status: int, stderr: bytes | str) -> AgentError | None:
    """The client's CompileError for a launcher that exited with ``LIMIT_EXIT``, or None."""
    if status != LIMIT_EXIT:
        return None
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    reason = next((line[len(LIMIT_MARK):] for line in reversed(text.splitlines())
                   if line.startswith(LIMIT_MARK)), "the compile crossed a limit of this agent")
    return AgentError("CompileError", f"nvcc did not finish compiling your CUDA C: {reason}. "
                      "Make the source smaller (deep or exponential template instantiation, "
                      "huge unrolled loops and constant tables are the usual causes), or ask the "
                      "agent's operator to raise the limit. Nothing else of your session changed")
