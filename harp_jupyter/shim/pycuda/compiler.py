"""pycuda.compiler, forwarded: CUDA sources are compiled by nvcc on the agent (cached there by
source and options), not here. ``SourceModule`` waits for the agent's compiler, so that a compile
error is raised by the call itself, as with pycuda (compiling is a wait users expect).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from harp_jupyter.shim.errors import LogicError, NotSupportedError, user_facing
from harp_jupyter.shim.pycuda._enums import jit_input_type
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
    ``include_dirs`` is refused by the agent (it would name the agent's directories), and
    ``options`` must be on its nvcc allow-list (gpu_agent/nvcc_options.py); ``arch`` defaults to
    the agent's GPU."""

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


class DynamicModule(CudaModule):
    """pycuda's DynamicModule: CUDA sources, binary pieces and CUDA libraries (``cudadevrt``
    for dynamic parallelism) linked into one module on the agent. Sources are compiled with the
    agent's nvcc and libraries come from its CUDA toolkit; ``add_file`` reads the file here.
    Everything is sent at ``link()``, so a compile or link error is raised there (pycuda raises
    a compile error at ``add_source``). ``nvcc``, ``keep``, ``cache_dir``, ``cuda_libdir``,
    ``link_options``, ``message_handler`` and ``log_verbose`` concern the local toolchain and
    are ignored."""

    def __init__(self, nvcc: str = "nvcc", link_options: Any = None, keep: bool = False,
                 no_extern_c: bool = False, arch: str | None = None, code: str | None = None,
                 cache_dir: Any = None, include_dirs: Sequence[str] | None = None,
                 message_handler: Any = None, log_verbose: bool = False,
                 cuda_libdir: Any = None) -> None:
        self._options = {"no_extern_c": bool(no_extern_c), "arch": arch, "code": code,
                         "include_dirs": [str(d) for d in include_dirs or []]}
        self._inputs: list[list[Any]] = []
        self._data = bytearray()
        self.module: Module | None = None  # type: ignore[assignment]

    def _pending(self) -> None:
        if self.module is not None:
            raise RuntimeError("this DynamicModule is already linked")

    def add_source(self, source: str, nvcc_options: Sequence[str] | None = None,
                   name: str = "kernel.ptx") -> DynamicModule:
        self._pending()
        options = DEFAULT_NVCC_FLAGS if nvcc_options is None else nvcc_options
        self._inputs.append(["source", str(source), [str(o) for o in options], str(name)])
        return self

    def add_data(self, data: Any, input_type: Any, name: str = "unknown") -> DynamicModule:
        self._pending()
        raw = data.encode() if isinstance(data, str) else memoryview(data).tobytes()
        self._inputs.append(["data", jit_input_type(int(input_type)).name, str(name),
                             len(self._data), len(raw)])
        self._data += raw
        return self

    def add_file(self, filename: str, input_type: Any) -> DynamicModule:
        with open(filename, "rb") as f:
            return self.add_data(f.read(), input_type, os.path.basename(filename))

    def add_stdlib(self, libname: str) -> DynamicModule:
        self._pending()
        self._inputs.append(["stdlib", str(libname)])
        return self

    @user_facing
    def link(self) -> DynamicModule:
        self._pending()
        if not self._inputs:
            raise LogicError("cuLinkComplete failed: nothing was added to this DynamicModule")
        session = get_session()
        handle = session.new_handle()
        session.call_sync("module_link", handle, self._inputs, bytes(self._data), self._options)
        self.module = Module(session, handle)
        self._inputs, self._data = [], bytearray()
        self._bind_module()
        return self


class DynamicSourceModule(DynamicModule):
    """pycuda's DynamicSourceModule: one source compiled as relocatable device code
    (``-rdc=true``) and linked with ``cudadevrt`` on the agent, so its kernels may launch
    kernels (dynamic parallelism)."""

    @user_facing
    def __init__(self, source: str, nvcc: str = "nvcc", options: Sequence[str] | None = None,
                 keep: bool = False, no_extern_c: bool = False, arch: str | None = None,
                 code: str | None = None, cache_dir: Any = None,
                 include_dirs: Sequence[str] | None = None, cuda_libdir: Any = None) -> None:
        super().__init__(nvcc=nvcc, keep=keep, no_extern_c=no_extern_c, arch=arch, code=code,
                         cache_dir=cache_dir, include_dirs=include_dirs,
                         cuda_libdir=cuda_libdir)
        options = list(DEFAULT_NVCC_FLAGS if options is None else options)
        for flag in ("-rdc=true", "-lcudadevrt"):
            if flag not in options:
                options.append(flag)
        self.add_source(source, nvcc_options=options)
        self.add_stdlib("cudadevrt")
        self.link()


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
