"""Compiled CUDA C that clients send is cached per session, never in pycuda's shared cache.

pycuda keeps what nvcc made in one directory for every process of a user (``compile_plain``:
``~/.cache/pycuda/compiler-cache-v1``), named by an MD5 of the source (preprocessed where it
has ``#include``), the options and nvcc's version. On an agent every tenant's workers would share
it, and a tenant could:

- *read* another's work: compiling a guessed source and seeing it come back at once instead of
  after seconds of nvcc says someone on this agent compiled exactly that (and a source with a
  low-entropy secret in it can be guessed one compile at a time);
- *substitute* another's kernel: MD5 collisions are cheap to make for two sources one author
  controls, so a published kernel whose twin the attacker compiled first comes out of the cache
  as the twin's code for everyone who compiles it afterwards on this agent;
- fill the disk: nothing bounds the directory.

So a compile of a client's source (``nvcc_sandbox.user_source``) skips pycuda's directory and is
kept in its worker's memory instead, keyed by SHA-256: a worker serves one session, so only that
session's own compiles hit, and ``forget`` empties it when the session closes. What costs: a
session restored in a new worker compiles its modules again. The agent's own kernels (pycuda's
gpuarray and cuRAND modules, whose sources come from pycuda's templates and dtypes, not from a
client's text) keep the shared cache. Eviction past ``MAX_BYTES`` is least-recently-used and only
means a compile runs again: no client ever gets an error from it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

#: compiled bytes one worker keeps for its session's sources
MAX_BYTES = 64 << 20


class SessionCompileCache:
    """SHA-256 of (source, options, nvcc, target) -> what nvcc made, least recently used first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(source: str, options: Sequence[str], nvcc: str, target: str) -> str:
        digest = hashlib.sha256()
        for part in (source, *options, "\0options-end", nvcc, target):
            data = str(part).encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))  # no two part lists hash alike
            digest.update(data)
        return digest.hexdigest()

    def get_or_compile(self, key: str, compile_: Callable[[], bytes]) -> bytes:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        made = bytes(compile_())
        if len(made) <= self.max_bytes:
            self._entries[key] = made
            self._bytes += len(made)
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
        return made

    def forget(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


#: this worker's (its one session's) compiles of client sources
SESSION = SessionCompileCache()


def route(compiler: Any, is_client_source: Callable[[], bool]) -> None:
    """Make ``compiler.compile_plain`` (pycuda.compiler's) keep client sources in ``SESSION``
    instead of pycuda's shared directory."""
    original = getattr(compiler, "_harp_compile_plain", compiler.compile_plain)

    def compile_plain(source: str, options: list[str], keep: bool, nvcc: str, cache_dir: Any,
                      target: str = "cubin") -> bytes:
        if not is_client_source():
            return original(source, options, keep, nvcc, cache_dir, target)
        return SESSION.get_or_compile(
            SessionCompileCache.key(source, options, nvcc, target),
            lambda: original(source, options, keep, nvcc, None, target))

    compiler._harp_compile_plain = original
    compiler.compile_plain = compile_plain
