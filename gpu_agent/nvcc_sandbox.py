"""Every nvcc pycuda runs on the agent runs in a Linux Landlock sandbox.

The allow-list (nvcc_options) keeps a client's options from naming the agent's files, but the
source itself can: ``#include "/etc/passwd"``, or a macro that expands to a path, is resolved by
the preprocessor, and the file's text would come back in the compile error or be compiled into
the module. Checking ``#include`` lines cannot catch computed includes, so nvcc runs where it
cannot open such files: Landlock (Linux 5.13+) lets the process that starts nvcc give up, for
itself and everything it execs, every file access except reading the system's programs,
libraries and headers (``/usr``, ``/lib*``, ``/bin``), the CUDA toolkit and pycuda's headers,
and writing the compile's own temporary directories. TCP is refused too where the kernel can
(Landlock ABI 4). Compiler Explorer isolates its compilers the same way (nsjail) on top of
filtering options; NVRTC would not help, since it also reads headers from the file system.

pycuda starts nvcc through ``pycuda.compiler.call_capture_output``; ``install`` routes that
through this module's ``main`` (``python -m gpu_agent.nvcc_sandbox ... -- nvcc ...``), which
restricts itself and runs nvcc within the limits of gpu_agent/nvcc_limits.py (CPU, memory,
wall clock). Where Landlock is missing, CUDA C sent by a client is refused (``user_source``),
while the agent's own kernels (pycuda's gpuarray ops) still compile; the operator may also
refuse it everywhere, or compile it unsandboxed (``--client-cuda-source``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gpu_agent import compile_cache, nvcc_limits
from gpu_agent.errors import AgentError
from gpu_agent.nvcc_limits import NvccPolicy

log = logging.getLogger("harp.agent.nvcc")

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1, 2, 4, 8
#: rights a rule on a regular file may carry
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | (1 << 14) | (1 << 15)
_READ = _EXECUTE | _READ_FILE | _READ_DIR

#: what nvcc and its host compiler read: programs, libraries, system headers, the loader's cache
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt/cuda",
               "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives")
#: devices nvcc opens
DEVICES = ("/dev/null",)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def _handled_fs(abi: int) -> int:
    # ABI 1: 13 rights; 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV
    bits = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)
    return (1 << bits) - 1


def restrict(read: Sequence[str], write: Sequence[str]) -> None:
    """Restrict this process and all it execs to reading ``read`` and reading and writing
    ``write`` (files or directories, missing ones skipped); no TCP where the kernel can."""
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available")
    libc = _libc()
    handled = _handled_fs(abi)
    attr = _RulesetAttr(handled, 3 if abi >= 4 else 0, 0)  # 3: bind and connect TCP
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(
        ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for paths, rights in ((read, _READ & handled), (write, handled)):
            for path in paths:
                _add_rule(libc, ruleset, path, rights)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _add_rule(libc: Any, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(rights, fd)
        if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    finally:
        os.close(fd)


def toolkit_dirs(nvcc: str) -> list[str]:
    """Where the CUDA toolkit behind ``nvcc`` lives (the wrapper script's directory and the real
    nvcc's toolkit root, plus CUDA_HOME and friends)."""
    found = []
    where = shutil.which(nvcc)
    if where is not None:
        found.append(os.path.dirname(os.path.abspath(where)))
        found.append(os.path.dirname(os.path.dirname(os.path.realpath(where))))
    for name in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(name):
            found.append(os.path.realpath(os.environ[name]))
    return found


def pycuda_headers() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("pycuda")
    if spec is None or spec.origin is None:
        return []
    return [os.path.join(os.path.dirname(spec.origin), "cuda")]


def sandboxed(cmdline: Sequence[str], cwd: str | None, tmp: str,
              policy: NvccPolicy = nvcc_limits.DEFAULT_POLICY) -> list[str]:
    """The command that runs ``cmdline`` (an nvcc invocation pycuda built) in the sandbox:
    reading the system, the toolkit, pycuda's headers and the files the command names, writing
    only ``cwd`` (pycuda's compile directory) and ``tmp`` (nvcc's TMPDIR), within ``policy``'s
    limits (gpu_agent/nvcc_limits.py; its mode ``unsafe-unsandboxed`` skips Landlock)."""
    read = [*SYSTEM_READ, *toolkit_dirs(cmdline[0]), *pycuda_headers()]
    # pycuda's preprocess step names its source file by its absolute path
    read += [a for a in cmdline[1:] if a.endswith(".cu") and os.path.isabs(a)]
    write = [tmp, *DEVICES, *([os.path.abspath(cwd)] if cwd else [])]
    args = [sys.executable, "-m", "gpu_agent.nvcc_sandbox", "--tmp", tmp,
            "--policy", policy.to_arg()]
    for path in read:
        args += ["--read", path]
    for path in write:
        args += ["--write", path]
    return [*args, "--", *cmdline]


_local = threading.local()


@contextlib.contextmanager
def user_source() -> Iterator[None]:
    """Marks compiles of CUDA C a client sent: refused where nvcc cannot be sandboxed."""
    saved = getattr(_local, "user", False)
    _local.user = True
    try:
        yield
    finally:
        _local.user = saved


UNAVAILABLE = ("this GPU agent cannot sandbox nvcc (Linux Landlock, kernel 5.13 or later with "
               "landlock among its security modules, is not available), so it compiles no CUDA C "
               "a client sends: its #include lines could read the agent's files. Array "
               "operations still work; ask the agent's operator for a kernel with Landlock")


def install(policy: NvccPolicy = nvcc_limits.DEFAULT_POLICY) -> int:
    """Route every nvcc pycuda starts in this process through the launcher: Landlock (mode
    ``sandboxed``) and ``policy``'s limits; the Landlock ABI version in use (0: none, and user
    sources are refused unless the operator chose ``unsafe-unsandboxed``)."""
    import pycuda.compiler as compiler

    original: Callable[..., Any] = getattr(compiler, "_harp_unsandboxed",
                                           compiler.call_capture_output)
    abi = abi_version() if policy.mode != nvcc_limits.UNSAFE else 0
    refusal = (nvcc_limits.REFUSED if policy.mode == nvcc_limits.REFUSE
               else UNAVAILABLE if policy.mode == nvcc_limits.SANDBOXED and abi < 1 else None)

    def call_capture_output(cmdline: Sequence[str], cwd: str | None = None,
                            error_on_nonzero: bool = True) -> Any:
        if refusal is not None and getattr(_local, "user", False):
            raise AgentError("NotSupported", refusal)
        with tempfile.TemporaryDirectory(prefix="harp-nvcc-") as tmp:
            # without Landlock (refused user sources, or the operator's unsafe choice) the
            # launcher still applies the limits
            limited = policy if abi >= 1 else dataclasses.replace(policy, mode=nvcc_limits.UNSAFE)
            result = original(sandboxed(cmdline, cwd, tmp, limited), cwd, False)
        error = nvcc_limits.limit_error(result[0], result[2])
        if error is not None:
            raise error
        if error_on_nonzero and result[0] != 0:
            from pytools.prefork import ExecError  # what pycuda's own call raises

            raise ExecError(f"process '{cmdline[0]}' terminated with return code {result[0]}")
        return result

    compiler._harp_unsandboxed = original
    compiler.call_capture_output = call_capture_output
    compile_cache.route(compiler, lambda: getattr(_local, "user", False))
    if refusal is None:
        # asked now, in a worker waiting for a session, not when a restore looks up its code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no nvcc: compiles will say so
            if compile_cache.nvcc_identity(compiler, "nvcc") is None:
                log.info("nvcc --version failed: clients' compiles are not cached")
    return abi


def main(argv: list[str]) -> None:
    """``python -m gpu_agent.nvcc_sandbox --tmp DIR --policy P [--read P]... [--write P]...
    -- cmd...``"""
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    read, write, tmp, policy = [], [], None, NvccPolicy()
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if flag == "--read":
            read.append(value)
        elif flag == "--write":
            write.append(value)
        elif flag == "--tmp":
            tmp = value
        elif flag == "--policy":
            policy = NvccPolicy.parse(value)
    if tmp is not None:
        os.environ["TMPDIR"] = tmp
    if policy.mode != nvcc_limits.UNSAFE:
        restrict(read, write)
    sys.exit(nvcc_limits.run_limited(command, policy))


if __name__ == "__main__":
    main(sys.argv[1:])
