"""gpu_agent.compile_cache: a client's CUDA C never reaches pycuda's shared compile cache, and
its own compiles are kept for its session only, and travel with its parked state (written and
read back by gpu_agent/parked_io.py, with the emulated executor's session). pycuda.compiler is
stood in for by a namespace with its compile_plain's signature (which directory it was given,
what it compiled); the real thing on a GPU: tests/gpu/test_nvcc_limits_gpu.py and
tests/gpu/test_park_gpu.py."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from gpu_agent import compile_cache
from gpu_agent import protocol as P
from gpu_agent.batches import BatchRunner
from gpu_agent.compile_cache import SessionCompileCache
from gpu_agent.errors import AgentError
from gpu_agent.executors.emulated import EmulatedExecutor
from gpu_agent.parked_io import ParkedStateIO


def _compiler() -> SimpleNamespace:
    calls: list[tuple[str, Any]] = []

    def compile_plain(source: str, options: list[str], keep: bool, nvcc: str, cache_dir: Any,
                      target: str = "cubin") -> bytes:
        calls.append((source, cache_dir))
        return f"cubin of {source}".encode()

    return SimpleNamespace(compile_plain=compile_plain, calls=calls)


def test_client_sources_skip_the_shared_directory_and_hit_only_their_sessions_cache() -> None:
    compiler, client = _compiler(), {"now": True}
    compile_cache.route(compiler, lambda: client["now"])
    compile_cache.SESSION.forget()
    try:
        first = compiler.compile_plain("kernel A", ["-O3"], False, "nvcc", "/shared", "cubin")
        again = compiler.compile_plain("kernel A", ["-O3"], False, "nvcc", "/shared", "cubin")
        assert first == again == b"cubin of kernel A"
        assert compiler.calls == [("kernel A", None)]  # nvcc ran once, with no directory
        compile_cache.SESSION.forget()  # the session closed: the next one compiles anew
        compiler.compile_plain("kernel A", ["-O3"], False, "nvcc", "/shared", "cubin")
        assert compiler.calls == [("kernel A", None), ("kernel A", None)]
        client["now"] = False  # the agent's own kernels keep pycuda's shared cache
        compiler.compile_plain("gpuarray axpbyz", [], False, "nvcc", "/shared", "cubin")
        assert compiler.calls[-1] == ("gpuarray axpbyz", "/shared")
    finally:
        compile_cache.SESSION.forget()


def test_keys_tell_apart_what_concatenation_would_not() -> None:
    key = SessionCompileCache.key
    assert key("ab", ["c"], "nvcc", "cubin") != key("a", ["bc"], "nvcc", "cubin")
    assert key("a", ["-O3"], "nvcc", "cubin") != key("a", ["-O3"], "nvcc", "ptx")
    assert key("a", [], "nvcc", "cubin") == key("a", [], "nvcc", "cubin")


def test_the_cache_keeps_its_bound_least_recently_used_first() -> None:
    cache = SessionCompileCache(max_bytes=10)
    cache.get_or_compile("a", lambda: b"aaaa")
    cache.get_or_compile("b", lambda: b"bbbb")
    cache.get_or_compile("a", lambda: b"never")  # a hit: now the most recent
    cache.get_or_compile("c", lambda: b"cccc")  # 12 bytes: b goes
    assert cache.get_or_compile("a", lambda: b"new") == b"aaaa"
    assert cache.get_or_compile("b", lambda: b"BBBB") == b"BBBB"  # compiled again
    assert cache.get_or_compile("big", lambda: b"x" * 11) == b"x" * 11  # too big to keep
    assert len(cache) <= 2


# {{{ compiled code in parked state (gpu_agent/parked_io.py)

def _runner() -> BatchRunner:
    executor = EmulatedExecutor()
    base = P.ADDRESS_SPACE_BASE
    return BatchRunner(executor, executor.open_session(base, P.SESSION_RANGE_SIZE), base,
                       P.SESSION_RANGE_SIZE, memory_cap=1 << 30, max_frame=1 << 20)


def _io() -> ParkedStateIO:
    return ParkedStateIO(zmq.Context.instance(), None, fetch_timeout=5, max_frame=1 << 20)


def test_a_restored_session_loads_its_parked_code_without_compiling_again(tmp_path: Path
                                                                          ) -> None:
    compiler = _compiler()
    compile_cache.route(compiler, lambda: True)
    compile_cache.SESSION.forget()
    try:
        made = compiler.compile_plain("kernel A", ["-arch", "sm_90"], False, "nvcc", None)
        runner = _runner()
        runner.call("alloc", [P.ADDRESS_SPACE_BASE, 2 << 20])
        chunks = _io().write(runner, "s1", tmp_path, 1 << 30, tmp_path)
        code = [c for c in chunks if c[0] == compile_cache.PARKED_CHUNK]
        assert code and code[0][1] == compile_cache.SESSION.parked_bytes
        runner.device.close()
        compile_cache.SESSION.forget()  # the worker that parked it ended with its cache
        _io().restore_from_files(_runner(), {"chunks": chunks, "log": []})
        again = compiler.compile_plain("kernel A", ["-arch", "sm_90"], False, "nvcc", None)
        assert again == made
        assert compiler.calls == [("kernel A", None)]  # nvcc ran once, before the park
        compiler.compile_plain("kernel A", ["-arch", "sm_80"], False, "nvcc", None)
        assert len(compiler.calls) == 2  # other options: no hit
    finally:
        compile_cache.SESSION.forget()


def test_parked_code_is_served_only_for_the_compile_its_key_names() -> None:
    """A tampered record (another agent's, or altered on disk) keyed for source A with other
    code stands in for A alone: never for a compile of B, nor for A by another nvcc."""
    compiler = _compiler()
    compile_cache.route(compiler, lambda: True)
    parked = SessionCompileCache()
    parked.get_or_compile(SessionCompileCache.key("kernel A", [], "nvcc", "cubin"),
                          lambda: b"someone else's code")
    compile_cache.SESSION.forget()
    try:
        compile_cache.SESSION.seed(b"".join(parked.records()))
        assert compiler.compile_plain("kernel B", [], False, "nvcc", None) == b"cubin of kernel B"
        compiler.get_nvcc_version = lambda nvcc: "release 13.0"
        assert compiler.compile_plain("kernel A", [], False, "nvcc", None) == b"cubin of kernel A"
        assert [source for source, _ in compiler.calls] == ["kernel B", "kernel A"]
    finally:
        compile_cache.SESSION.forget()


def test_malformed_parked_code_is_refused_whole() -> None:
    good = SessionCompileCache()
    good.get_or_compile("ab" * 32, lambda: b"code")
    records = b"".join(good.records())
    for bad in (records[:-1],  # cut short
                records + b"\0" * 39,  # a header cut short
                records[:32] + (1 << 40).to_bytes(8, "little") + records[40:]):  # too long
        cache = SessionCompileCache()
        with pytest.raises(ValueError):
            cache.seed(bad)
        assert len(cache) == 0
    small = SessionCompileCache(max_bytes=8, max_entries=1)
    with pytest.raises(ValueError, match="more than a session keeps"):
        small.seed(records + records)
    assert small.seed(records) == 1 and len(small) == 1


def test_parked_code_keeps_the_caches_bounds() -> None:
    many = SessionCompileCache(max_entries=100)
    for i in range(5):
        many.get_or_compile(f"{i:064x}", lambda i=i: bytes([i]) * 4)
    few = SessionCompileCache(max_bytes=1 << 20, max_entries=3)
    few.seed(b"".join(many.records()))
    assert len(few) == 3  # the least recently used went first, as in a worker
    assert few.get_or_compile(f"{4:064x}", lambda: b"again") == b"\x04" * 4
    assert few.get_or_compile(f"{0:064x}", lambda: b"again") == b"again"

# }}}


class _Origin:
    """The agent a drained session is fetched from, on a real ZeroMQ socket: it serves what the
    test gives it (its manifest's chunks, their bytes), as a faulty or hostile agent could."""

    def __init__(self, chunks: dict[int, bytes], sizes: dict[int, int] | None = None) -> None:
        self.chunks = chunks
        self.sizes = sizes or {addr: len(data) for addr, data in chunks.items()}
        self.asked: list[int] = []
        self.manifest_chunks = [[addr, size] for addr, size in self.sizes.items()]
        self.forgets = True  # it serves until told to forget (else only the manifest)
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            route, data = self.socket.recv_multipart()
            header = P.unpack_header(data)
            reply: dict[str, Any] = {"rid": header["rid"], "t": P.PARKED_STATE}
            frames: list[bytes] = []
            if header["t"] == P.PARKED_FETCH:
                reply["manifest"] = {
                    "session": "s1", "kernel_id": "k1", "log": [],
                    "range": [P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE],
                    "chunks": self.manifest_chunks}
            elif header["t"] == P.PARKED_CHUNK:
                self.asked.append(header["addr"])
                start = header["offset"]
                frames = [self.chunks[header["addr"]][start:start + header["size"]]]
            else:
                reply["t"] = P.DROPPED
            self.socket.send_multipart([route, P.pack_header(reply), *frames])
            if header["t"] == P.PARKED_FORGET or not self.forgets:
                return

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.socket.close(0)


def _fetch(origin: _Origin, *, forgets: bool = True) -> int:
    """Restore from ``origin``; ``forgets``: the restore gets as far as telling it to forget
    (else it ends after the manifest)."""
    origin.forgets = forgets
    fetch = {"endpoint": origin.endpoint, "session": "s1", "resume_token": "r",
             "kernel_id": "k1", "token": None}
    try:
        return _io().restore_from_agent(_runner(), fetch, P.ADDRESS_SPACE_BASE)
    finally:
        origin.close()


def test_code_fetched_from_another_agent_is_checked_before_it_is_kept() -> None:
    parked = SessionCompileCache()
    key = SessionCompileCache.key("kernel A", [], "nvcc", "cubin")
    parked.get_or_compile(key, lambda: b"cubin of kernel A")
    records = b"".join(parked.records())
    compile_cache.SESSION.forget()
    try:
        _fetch(_Origin({compile_cache.PARKED_CHUNK: records}))
        assert compile_cache.SESSION.get_or_compile(key, lambda: b"nvcc") == b"cubin of kernel A"
        compile_cache.SESSION.forget()
        # malformed records: the session is restored all the same, its code compiles again
        assert _fetch(_Origin({compile_cache.PARKED_CHUNK: records[:-1]})) == len(records) - 1
        assert len(compile_cache.SESSION) == 0
        # a size past what a session keeps is never fetched (no host memory spent on it)
        huge = compile_cache.SESSION.max_parked_bytes + 1
        origin = _Origin({compile_cache.PARKED_CHUNK: records}, {compile_cache.PARKED_CHUNK: huge})
        _fetch(origin)
        assert origin.asked == [] and len(compile_cache.SESSION) == 0
        # nor is it fetched twice (each would be within the bound, their sum without end)
        origin = _Origin({compile_cache.PARKED_CHUNK: records})
        origin.manifest_chunks = [[compile_cache.PARKED_CHUNK, len(records)]] * 2
        with pytest.raises(AgentError, match="compiled code twice"):
            _fetch(origin, forgets=False)
        assert origin.asked == []
    finally:
        compile_cache.SESSION.forget()


def test_device_memory_is_fetched_in_pieces_within_max_frame() -> None:
    """A piece of parked state comes as one frame: an agent with a --max-frame below
    PIECE_BYTES asks for pieces it can take (_io()'s is 1 MiB)."""
    data = bytes(range(256)) * (16 << 10)  # 4 MiB
    origin = _Origin({P.ADDRESS_SPACE_BASE: data})
    assert _fetch(origin) == len(data)
    assert origin.asked == [P.ADDRESS_SPACE_BASE] * 4


def test_objects_fetched_from_another_agent_are_bounded_before_any_is_fetched() -> None:
    """Torch objects are held whole in host memory while rebuilt: a hostile agent's manifest
    that lists more of them, or more bytes, than a session of this slot can have is refused
    before a byte is fetched (device chunks are bounded by their ``alloc``)."""
    from gpu_agent.executors.base import object_chunk_address
    from gpu_agent.executors.torch_ops import MAX_TENSORS

    cap = 1 << 30  # the slot of _runner()
    too_big = _Origin({object_chunk_address(0): b"index", object_chunk_address(1): b""},
                      {object_chunk_address(0): 5, object_chunk_address(1): 2 * cap})
    with pytest.raises(AgentError, match=r"2 parked objects of 2\.0 GiB .*--slot-memory"):
        _fetch(too_big, forgets=False)
    assert too_big.asked == []
    too_many = _Origin({})
    too_many.manifest_chunks = [[object_chunk_address(i), 1] for i in range(MAX_TENSORS + 2)]
    with pytest.raises(AgentError, match=f"{MAX_TENSORS + 2} parked objects"):
        _fetch(too_many, forgets=False)
    assert too_many.asked == []


def test_an_nvcc_that_cannot_tell_its_version_compiles_uncached() -> None:
    compiler = _compiler()

    def no_version(nvcc: str) -> str:
        raise OSError("nvcc: not found")

    compiler.get_nvcc_version = no_version
    compile_cache.route(compiler, lambda: True)
    compile_cache.SESSION.forget()
    try:
        for _ in range(2):
            compiler.compile_plain("kernel A", [], False, "nvcc", "/shared")
        assert compiler.calls == [("kernel A", None)] * 2  # never the shared directory
        assert len(compile_cache.SESSION) == 0
    finally:
        compile_cache.SESSION.forget()
