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
session's own compiles hit, and ``forget`` empties it when the session closes. The agent's own
kernels (pycuda's gpuarray and cuRAND modules, whose sources come from pycuda's templates and
dtypes, not from a client's text) keep the shared cache. Eviction past ``MAX_BYTES`` or
``MAX_ENTRIES`` is least-recently-used and only means a compile runs again: no client ever gets an
error from it.

A session's compiled code travels with its parked state (gpu_agent/parked_io.py: one chunk at
``PARKED_CHUNK``, ``records`` written, ``seed`` read back), so a restore replays its modules
without nvcc, whether in a worker on this agent or on another after a drain. What ``seed`` is
given is only a cache: an entry is served for a compile whose source, options, nvcc version and
target hash to its key, and nothing else, so an entry altered on the way (or sent by another
agent) can stand in for nothing but the compile it names, within the session it came with.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: compiled bytes one worker keeps for its session's sources
MAX_BYTES = 64 << 20
#: compiles one worker keeps for its session (bounds what a parked state's records add)
MAX_ENTRIES = 4096
#: the parked-state chunk address the session's compiled code is kept under: negative, like
#: session objects' (-1, -2, ...), so no device address can be it, and far from theirs
PARKED_CHUNK = -(1 << 62)
#: a record in parked state: the key's 32 bytes, then the code's length (8 bytes, little endian)
RECORD_HEADER = 40


class SessionCompileCache:
    """SHA-256 of (source, options, nvcc, target) -> what nvcc made, least recently used first."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
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
        self._keep(key, made)
        return made

    def _keep(self, key: str, made: bytes) -> None:
        if len(made) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        self._bytes += len(made) - (len(old) if old is not None else 0)
        self._entries[key] = made
        while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped)

    def forget(self) -> None:
        self._entries.clear()
        self._bytes = 0

    # {{{ in parked state

    @property
    def parked_bytes(self) -> int:
        """The size of ``records``: what parking this cache adds to a session's parked state."""
        return self._bytes + RECORD_HEADER * len(self._entries)

    @property
    def max_parked_bytes(self) -> int:
        return self.max_bytes + RECORD_HEADER * self.max_entries

    def records(self) -> Iterator[bytes]:
        """The entries as parked state stores them, least recently used first."""
        for key, made in self._entries.items():
            yield bytes.fromhex(key) + len(made).to_bytes(8, "little")
            yield made

    def seed(self, packed: bytes | bytearray | memoryview) -> int:
        """Take the entries ``records`` wrote (read back from parked state); how many. All or
        nothing: ValueError when ``packed`` is not such records within this cache's bounds."""
        view = memoryview(packed).cast("B")
        if view.nbytes > self.max_parked_bytes:
            raise ValueError(f"{view.nbytes} bytes of compiled code are more than a session keeps")
        found: list[tuple[str, bytes]] = []
        at = 0
        while at < view.nbytes:
            if view.nbytes - at < RECORD_HEADER:
                raise ValueError("a compiled-code record is cut short")
            key = view[at:at + 32].hex()
            size = int.from_bytes(view[at + 32:at + RECORD_HEADER], "little")
            at += RECORD_HEADER
            if size > view.nbytes - at:
                raise ValueError("a compiled-code record is longer than what holds it")
            found.append((key, bytes(view[at:at + size])))
            at += size
        for key, made in found:
            self._keep(key, made)
        return len(found)

    # }}}

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
        identity = nvcc_identity(compiler, nvcc)
        if identity is None:  # the compile itself says what is wrong with nvcc
            return original(source, options, keep, nvcc, None, target)
        return SESSION.get_or_compile(SessionCompileCache.key(source, options, identity, target),
                                      lambda: original(source, options, keep, nvcc, None, target))

    compiler._harp_compile_plain = original
    compiler.compile_plain = compile_plain


def nvcc_identity(compiler: Any, nvcc: str) -> str | None:
    """``nvcc`` and the version it reports (pycuda's ``get_nvcc_version``, asked once per
    process): code parked by another agent's toolkit is no hit for this one's. None when nvcc
    cannot say (nothing is cached then)."""
    version = getattr(compiler, "get_nvcc_version", None)
    if version is None:
        return nvcc
    try:
        return f"{nvcc}\0{version(nvcc)}"
    except Exception:  # an nvcc that fails here fails its compile too, with the reason
        return None
