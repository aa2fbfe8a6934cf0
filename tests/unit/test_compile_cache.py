"""gpu_agent.compile_cache: a client's CUDA C never reaches pycuda's shared compile cache, and
its own compiles are kept for its session only. pycuda.compiler is stood in for by a namespace
with its compile_plain's signature (which directory it was given, what it compiled); the real
thing on a GPU: tests/gpu/test_nvcc_limits_gpu.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from gpu_agent import compile_cache
from gpu_agent.compile_cache import SessionCompileCache


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
