"""pycuda.compiler, forwarded: CUDA sources are compiled by nvcc on the agent (cached there by
source and options), not here. ``SourceModule`` waits for the agent's compiler, so that a compile
error is raised by the call itself, as with pycuda (compiling is a wait users expect).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from harp_jupyter.shim.errors import NotSupportedError, user_facing
from harp_jupyter.shim.pycuda.driver import Function, Module
from harp_jupyter.shim.session import get_session

DEFAULT_NVCC_FLAGS = [
    flag for flag in os.environ.get("PYCUDA_DEFAULT_NVCC_FLAGS", "").split() if flag.strip()]


class CudaModule:
    module: Module

    def _bind_module(self) -> None:
        self.get_global = self.module.get_global
        self.get_texref = self.module.get_texref
        self.get_surfref = self.module.get_surfref

    def get_function(self, name: str) -> Function:
        return self.module.get_function(name)


class SourceModule(CudaModule):
    """pycuda's SourceModule: ``source`` compiled on the agent for its GPU.

    ``nvcc``, ``keep`` and ``cache_dir`` concern the local compiler and are ignored;
    ``include_dirs`` are directories on the agent's machine; ``arch`` defaults to the agent's
    GPU."""

    @user_facing
    def __init__(self, source: str, nvcc: str = "nvcc", options: Sequence[str] | None = None,
                 keep: bool = False, no_extern_c: bool = False, arch: str | None = None,
                 code: str | None = None, cache_dir: Any = None,
                 include_dirs: Sequence[str] | None = None) -> None:
        options = list(DEFAULT_NVCC_FLAGS if options is None else options)
        session = get_session()
        handle = session.new_handle()
        session.call_sync("module_source", handle, str(source), [str(o) for o in options],
                     bool(no_extern_c), arch, code, [str(d) for d in include_dirs or []])
        self.source = source
        self.module = Module(session, handle)
        self._bind_module()


_NO_DYNAMIC = (
    "{what} (relocatable device code linked with cudadevrt: dynamic parallelism) is not"
    " forwarded by HARP's shim yet; use SourceModule")


class DynamicModule(CudaModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError(_NO_DYNAMIC.format(what="DynamicModule"))


class DynamicSourceModule(DynamicModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError(_NO_DYNAMIC.format(what="DynamicSourceModule"))


def get_nvcc_version(nvcc: str = "nvcc") -> str:
    raise NotSupportedError("get_nvcc_version: nvcc runs on the GPU agent, not here")


def preprocess_source(source: str, options: Any, nvcc: str) -> str:
    raise NotSupportedError("preprocess_source: nvcc runs on the GPU agent, not here")


def compile_plain(source: str, options: Any, keep: bool, nvcc: str, cache_dir: Any,
                  target: str = "cubin") -> bytes:
    raise NotSupportedError("compile_plain: nvcc runs on the GPU agent, not here; use "
                            "SourceModule")


def compile(source: str, *args: Any, **kwargs: Any) -> bytes:
    raise NotSupportedError(
        "pycuda.compiler.compile (a local cubin) is not supported by HARP's forwarding shim:"
        " sources are compiled on the agent; use SourceModule")
