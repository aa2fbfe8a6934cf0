"""Executors: what actually runs forwarded calls (a real GPU through pycuda, or NumPy emulation)."""

from __future__ import annotations

from typing import Any

from gpu_agent.executors.base import Executor


def gpu_available(device: int = 0) -> str | None:
    """None when pycuda can use GPU ``device``; otherwise why not, in words."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        return f"pycuda is not installed ({e}); pip install 'harp-jupyter[agent]'"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as e:
        return f"CUDA could not be initialised: {e}"
    if device >= count:
        return f"GPU {device} does not exist (this machine has {count})"
    return None


def make_executor(name: str | None, device: int = 0, **options: Any) -> Executor:
    """The executor called ``name`` ("pycuda" or "emulated"; None: pycuda if a GPU is usable)."""
    if name is None:
        name = "pycuda" if gpu_available(device) is None else "emulated"
    if name == "pycuda":
        from gpu_agent.executors.pycuda_exec import PycudaExecutor

        return PycudaExecutor(device, pinned_staging=int(options.get("pinned_staging") or 0),
                              nvcc=options.get("nvcc") or "")
    if name == "emulated":
        from gpu_agent.executors.emulated import EmulatedExecutor

        memory = options.get("emulated_memory")
        staging = int(options.get("pinned_staging") or 0)
        return (EmulatedExecutor(memory, staging=staging) if memory
                else EmulatedExecutor(staging=staging))
    raise ValueError(f"unknown executor {name!r}: use 'pycuda' or 'emulated'")
