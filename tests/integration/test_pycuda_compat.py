"""pycuda compatibility through the shim, against a real emulated agent (issue 12): errors that
read like pycuda's, pycuda's names and behaviours, and pycuda.curandom.rand's exact numbers."""

from __future__ import annotations

import importlib
import struct
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.conftest import shim_driver

SHIM_DIR = str(Path(__file__).resolve().parents[2] / "harp_jupyter" / "shim")


@pytest.fixture(scope="module")
def pycuda(module_emulated_agent: Any) -> Iterator[SimpleNamespace]:
    with shim_driver(module_emulated_agent.endpoint) as driver:
        yield SimpleNamespace(
            driver=driver, gpuarray=importlib.import_module("pycuda.gpuarray"),
            curandom=importlib.import_module("pycuda.curandom"),
            tools=importlib.import_module("pycuda.tools"),
            compiler=importlib.import_module("pycuda.compiler"),
            scan=importlib.import_module("pycuda.scan"))


def _frames(error: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(error.__traceback__)


# {{{ errors


def _take_out_of_range(gpuarray: ModuleType) -> Any:
    a = gpuarray.to_gpu(np.arange(4, dtype=np.float32))
    result = gpuarray.take(a, gpuarray.to_gpu(np.array([0, 9], np.int32)))  # the user's mistake
    return result.get()


def test_take_out_of_range_is_the_users_error_at_the_sync_point(pycuda: Any) -> None:
    with pytest.raises(pycuda.driver.LogicError) as caught:
        _take_out_of_range(pycuda.gpuarray)
    message = str(caught.value)
    assert "index 9 is out of bounds" in message
    assert "internal" not in message
    assert f"{Path(__file__).name}:" in message  # the line that called take()
    frames = _frames(caught.value)
    assert frames, "the traceback has the user's frames"
    assert not [f for f in frames if f.filename.startswith(SHIM_DIR)], frames
    assert frames[-1].name == "_take_out_of_range" and "result.get()" in (frames[-1].line or "")


def test_a_deferred_error_in_an_ipython_cell_names_the_cell(pycuda: Any) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.user_ns.update(np=np, gpuarray=pycuda.gpuarray)
        shell.run_cell("x = 1", store_history=True)
        result = shell.run_cell(
            "a = gpuarray.to_gpu(np.arange(4, dtype=np.float32))\n"
            "b = gpuarray.take(a, gpuarray.to_gpu(np.array([7], np.int32)))\n"
            "b.get()\n", store_history=True)
        error = result.error_in_exec
        assert isinstance(error, pycuda.driver.LogicError)
        count = result.execution_count
        assert f"Cell In[{count}], line 2" in str(error)
        assert "ipykernel" not in str(error) and "<ipython-input" not in str(error)
        shim_frames = [f for f in _frames(error) if f.filename.startswith(SHIM_DIR)]
        assert shim_frames == []
    finally:
        InteractiveShell.clear_instance()


def test_source_module_is_refused_by_the_call_itself_on_the_emulated_agent(pycuda: Any) -> None:
    with pytest.raises(pycuda.driver.Error) as caught:
        pycuda.compiler.SourceModule("__global__ void f() {}")
    assert "needs a real GPU" in str(caught.value)
    assert not [f for f in _frames(caught.value) if f.filename.startswith(SHIM_DIR)]
    with pytest.raises(pycuda.driver.Error, match="dynamic parallelism"):
        pycuda.compiler.DynamicSourceModule("__global__ void f() {}")


# }}}

# {{{ pycuda's behaviours


def test_creation_defaults_and_shapes(pycuda: Any) -> None:
    ga = pycuda.gpuarray
    assert ga.zeros(10).dtype == np.float64
    assert ga.empty(np.array(3), np.float32).shape == (3,)
    assert ga.empty(np.array([2, 3]), np.float32).shape == (2, 3)
    z = ga.to_gpu(np.asfortranarray(np.ones((4, 5), np.float32)))
    for like in (ga.empty_like, ga.zeros_like, ga.ones_like):
        for order, c, f in (("A", False, True), ("K", False, True), ("C", True, False),
                            ("F", False, True)):
            made = like(z, order=order)
            assert (made.flags.c_contiguous, made.flags.f_contiguous) == (c, f), (like, order)
    np.testing.assert_allclose(ga.ones_like(z).get(), np.ones((4, 5)))


def test_layouts_reshape_squeeze_and_copy(pycuda: Any) -> None:
    ga = pycuda.gpuarray
    host = np.random.default_rng(0).random((22, 33))
    fortran = np.asfortranarray(host)
    a = ga.to_gpu(fortran)
    assert a.strides == fortran.strides
    copied = a.copy()
    assert copied.strides == fortran.strides
    np.testing.assert_allclose(copied.get(), host)
    assert a.__cuda_array_interface__["strides"] == fortran.strides
    assert ga.zeros(4, np.float32).__cuda_array_interface__["strides"] == (4,)

    b = ga.to_gpu(np.arange(128, dtype=np.float32).reshape(8, 16))
    assert b.reshape(8, 16) is b
    assert b.reshape(4, 32, order="F").flags.f_contiguous
    assert b.reshape(-1, 32).shape == (4, 32)
    with pytest.raises(ValueError):
        b.reshape(-1, -1, 4)
    c = ga.to_gpu(np.random.default_rng(1).random((40, 2, 5, 100)))
    part = c[0:1, 1:2, :, :]
    assert part.flags.c_contiguous and part.squeeze().flags.c_contiguous
    np.testing.assert_allclose(part.squeeze().get(), c.get()[0, 1])
    assert not c[:, :, 2:3, :].squeeze().flags.c_contiguous
    assert b.squeeze() is b


def test_flags_are_instances_of_one_class_as_in_pycuda(pycuda: Any) -> None:
    ga = pycuda.gpuarray
    a = ga.zeros((3, 4), np.float32)
    f = ga.to_gpu(np.asfortranarray(np.ones((3, 4), np.float32)))
    assert type(a.flags) is type(f.flags) is type(a[:, ::2].flags)
    assert (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.forc) == (True, False, True)
    assert (f.flags.c_contiguous, f.flags.f_contiguous, f.flags.forc) == (False, True, True)
    assert not a[:, ::2].flags.forc


def test_functions_pycuda_has(pycuda: Any) -> None:
    ga = pycuda.gpuarray
    rng = np.random.default_rng(2)
    x, y = np.asfortranarray(rng.random((2, 2))), np.asfortranarray(rng.random((2, 2)))
    stacked = ga.stack((ga.to_gpu(x), ga.to_gpu(y)), axis=-1)
    np.testing.assert_allclose(stacked.get(), np.stack((x, y), axis=-1))

    z = (rng.random(20) + 1j * rng.random(20)).astype(np.complex64)
    z_gpu, out = ga.to_gpu(z), ga.empty(20, np.complex64)
    assert z_gpu.conj(out=out) is out
    np.testing.assert_allclose(out.get(), z.conj())

    a, b = np.arange(10, dtype=np.float32), np.arange(10, 20, dtype=np.float32)
    c_gpu = ga.empty(10, np.float32)
    assert ga.to_gpu(a).mul_add(2, ga.to_gpu(b), 3, out=c_gpu) is c_gpu
    np.testing.assert_allclose(c_gpu.get(), 2 * a + 3 * b)

    values, subset = rng.random(1000), np.array([3, 17, 400, 999], np.int32)
    v_gpu, s_gpu = ga.to_gpu(values), ga.to_gpu(subset)
    np.testing.assert_allclose(ga.subset_min(s_gpu, v_gpu).get(), values[subset].min())
    np.testing.assert_allclose(ga.subset_max(s_gpu, v_gpu).get(), values[subset].max())

    assert ga.vec.float4 == np.dtype([("x", np.float32), ("y", np.float32),
                                      ("z", np.float32), ("w", np.float32)])
    assert ga.vec.make_int2(1, 2)["y"] == 2
    assert pycuda.tools.dtype_to_ctype(ga.vec.float3) == "float3"


def test_scan_kernels(pycuda: Any) -> None:
    host = np.random.default_rng(3).integers(0, 10, 1000).astype(np.int32)
    for cls, expected in ((pycuda.scan.InclusiveScanKernel, np.cumsum(host)),
                          (pycuda.scan.ExclusiveScanKernel, np.cumsum(host) - host)):
        data = pycuda.gpuarray.to_gpu(host)
        cls(np.int32, "a+b", "0")(data)
        np.testing.assert_allclose(data.get(), expected)
    bytes_ = pycuda.gpuarray.zeros(600, np.uint8)
    bytes_.fill(1)
    wrapped = pycuda.scan.InclusiveScanKernel(np.uint8, "(a+b) & 0b11111111")(bytes_)
    np.testing.assert_allclose(wrapped.get(), np.arange(1, 601) % 256)


def test_device_attributes_are_keyed_like_pycudas(pycuda: Any) -> None:
    device = pycuda.driver.Device(0)
    attributes = {str(key): value for key, value in device.get_attributes().items()}
    assert attributes["MAX_THREADS_PER_BLOCK"] == device.get_attribute(
        pycuda.driver.device_attribute.MAX_THREADS_PER_BLOCK)
    assert f"{pycuda.driver.device_attribute.WARP_SIZE}" == "WARP_SIZE"


def test_tools(pycuda: Any) -> None:
    tools = pycuda.tools
    assert [tools.bitlog2(v) for v in (17, 0xAFFE, 0x3AFFE, 0xCC3AFFE)] == [4, 15, 17, 27]
    pool = tools.DeviceMemoryPool()
    for size in (1, 5, 100, 1000, 12345, 1 << 20, (1 << 31) - 1):
        bin_number = pool.bin_number(size)
        assert pool.alloc_size(bin_number) >= size
        assert pool.bin_number(pool.alloc_size(bin_number)) == bin_number
    block = pool.allocate(1000)
    assert int(block) and block.size == pool.alloc_size(pool.bin_number(1000))
    block.free()
    data = tools.DeviceData()
    record = tools.OccupancyRecord(data, threads=data.warp_size)
    assert record.limited_by in ("device", "warps") and 0 < record.occupancy <= 1
    dtype = np.dtype([("lo", np.float32), ("hi", np.float32)])
    tools.register_dtype(dtype, "harp_test_pair")
    assert tools.dtype_to_ctype(dtype) == "harp_test_pair"
    assert tools.get_or_register_dtype("harp_test_pair") == dtype


# }}}

# {{{ pycuda.curandom.rand: pycuda's MD5 generator, computed here independently


MD5_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def _md5_compress(words: list[int], state: tuple[int, ...] = MD5_INITIAL) -> list[int]:
    """RFC 1321's MD5 compression of one 16-word block (scalar, plain ints)."""
    import math

    def rotate(x: int, n: int) -> int:
        return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF

    table = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
    shifts = [[7, 12, 17, 22], [5, 9, 14, 20], [4, 11, 16, 23], [6, 10, 15, 21]]
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + table[i] + words[g]) & 0xFFFFFFFF
        a, d, c = d, c, b
        b = (b + rotate(f, shifts[i // 16][i % 4])) & 0xFFFFFFFF
    return [(x + s) & 0xFFFFFFFF for x, s in zip((a, b, c, d), state, strict=True)]


def _md5_hexdigest(message: bytes) -> str:
    padded = message + b"\x80" + b"\0" * ((55 - len(message)) % 64)
    padded += struct.pack("<Q", 8 * len(message))
    state: tuple[int, ...] = MD5_INITIAL
    for offset in range(0, len(padded), 64):
        state = tuple(_md5_compress(list(struct.unpack("<16I", padded[offset:offset + 64])),
                                    state))
    return struct.pack("<4I", *state).hex()


def test_the_reference_md5_is_md5() -> None:
    import hashlib

    for message in (b"", b"abc", b"x" * 55, b"y" * 64, bytes(range(200))):
        assert _md5_hexdigest(message) == hashlib.md5(message).hexdigest()


def _pycuda_rand(n: int, dtype: Any, seed: int, blocks: int, threads: int) -> np.ndarray:
    """pycuda.curandom.rand's numbers: thread t of an elementwise loop hashes (threadIdx.x,
    0, 0, blockIdx.x, 0, 0, seed, i, n, blockDim.x, 1, 1, gridDim.x, 1, 1, 0) for each i it
    visits and writes the words to elements i, i + T, i + 2T, i + 3T (T threads in all; two
    per step for float64, a * 2**-32 + b * 2**-64), then moves on to i + 4T (i + 2T)."""
    dtype = np.dtype(dtype)
    total = blocks * threads
    per_step = 2 if dtype == np.float64 else 4
    result = np.zeros(n, dtype)
    for t in range(total):
        for i in range(t, n, per_step * total):
            a, b, c, d = _md5_compress([t % threads, 0, 0, t // threads, 0, 0, seed, i, n,
                                        threads, 1, 1, blocks, 1, 1, 0])
            if dtype == np.float64:
                for j, (high, low) in enumerate(((a, b), (c, d))):
                    if i + j * total < n:
                        result[i + j * total] = high / 2.0**32 + low / 2.0**64
            else:
                for j, word in enumerate((a, b, c, d)):
                    if i + j * total < n:
                        result[i + j * total] = (
                            np.float32(word) * np.float32(2.0**-32) if dtype == np.float32
                            else np.uint32(word).view(dtype))
    return result


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint32])
def test_rand_gives_pycudas_numbers(pycuda: Any, dtype: Any) -> None:
    n = 5000  # several loop steps per thread on the emulated device (1 SM: 32 blocks max)
    np.random.seed(1234)
    got = pycuda.curandom.rand((50, 100), dtype).get()
    np.random.seed(1234)
    seed = np.random.randint(2**31 - 1)  # the draw pycuda makes
    (blocks, _), (threads, _, _) = pycuda.gpuarray.splay(n)
    expected = _pycuda_rand(n, dtype, seed, blocks, threads).reshape(50, 100)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)
    if np.dtype(dtype).kind == "f":
        assert got.min() >= 0 and got.max() <= 1 and got.std() > 0.2


def test_rand_follows_numpys_global_seed(pycuda: Any) -> None:
    np.random.seed(7)
    first = pycuda.curandom.rand(100).get()
    second = pycuda.curandom.rand(100).get()
    np.random.seed(7)
    np.testing.assert_array_equal(pycuda.curandom.rand(100).get(), first)
    assert not np.array_equal(first, second)


# }}}


def test_kernel_output_of_replies_is_printed_in_order_at_the_sync_point(
        capsys: pytest.CaptureFixture[str]) -> None:
    from harp_jupyter.shim.kernel_output import flush_kernel_output, note_reply_output

    note_reply_output({"t": "reply", "q": 1, "out": "Hello from block 0\n"})
    note_reply_output({"t": "reply", "q": 2})
    note_reply_output({"t": "reply", "q": 3, "out": "Hello from block 1\n"})
    assert capsys.readouterr().out == ""  # nothing before the sync point
    flush_kernel_output()
    assert capsys.readouterr().out == "Hello from block 0\nHello from block 1\n"
    flush_kernel_output()
    assert capsys.readouterr().out == ""


# {{{ gpuarray.vec: structured arrays and vector kernel arguments


@pytest.mark.parametrize("name", ["float3", "float4", "int2", "double2", "uchar3", "short1"])
def test_vector_arrays_zeros_fill_get(pycuda: Any, name: str) -> None:
    ga = pycuda.gpuarray
    dtype = getattr(ga.vec, name)
    make = getattr(ga.vec, f"make_{name}")
    zeros = ga.zeros(100, dtype)
    assert zeros.dtype == dtype and zeros.get().dtype == dtype
    assert not zeros.get().tobytes().strip(b"\0")
    components = [i + 1 for i in range(len(dtype.names))]
    filled = ga.GPUArray(100, dtype=dtype).fill(make(*components))  # pycuda's test_vector_fill
    host = filled.get()
    assert host.dtype == dtype
    for field, value in zip(dtype.names, components, strict=True):
        assert (host[field] == value).all(), (field, host[field][:4])
    same_words = make(*[7] * len(dtype.names))  # a repeating pattern takes the memset path
    np.testing.assert_array_equal(ga.empty(33, dtype).fill(same_words).get(),
                                  np.full(33, same_words, dtype))
    host = np.zeros(50, dtype)
    host[dtype.names[0]] = np.arange(50)
    round_trip = ga.to_gpu(host)
    np.testing.assert_array_equal(round_trip.get(), host)
    np.testing.assert_array_equal(round_trip.copy().get(), host)
    assert round_trip[10:20].get().tobytes() == host[10:20].tobytes()


def test_vector_fill_of_a_strided_view_is_refused_as_pycuda_refuses_it(pycuda: Any) -> None:
    ga = pycuda.gpuarray
    a = ga.zeros(10, ga.vec.float2)
    with pytest.raises(RuntimeError, match="contiguous"):
        a[::2].fill(ga.vec.make_float2(1, 2))


def test_vector_kernel_arguments_pack_as_pycuda_packs_them(pycuda: Any) -> None:
    from harp_jupyter.shim.pycuda import _kernel_args

    vec = pycuda.gpuarray.vec
    fmt = _kernel_args.format_for_types([vec.float3, np.int32, vec.double2])
    assert fmt == "12si16s"
    value = vec.make_float3(0.0, 1.0, 2.0)  # a 0-d structured ndarray, as prepared_call gets it
    packed = _kernel_args.pack(fmt, value, 5, vec.make_double2(1.5, -2.5))
    assert packed == struct.pack("12si16s", value.tobytes(), 5,
                                 np.array((1.5, -2.5), vec.double2).tobytes())
    # np.void items, bytearrays and bytes too; a shorter value is padded, as struct pads
    assert _kernel_args.pack("12s", value[()]) == value.tobytes()
    assert _kernel_args.pack("4s", bytearray(b"ab")) == b"ab\0\0"
    with pytest.raises(struct.error, match="must be a bytes object"):
        _kernel_args.pack("4s", 3)


# }}}


# {{{ DynamicModule, registered dtypes: what the emulated agent can check


def test_dynamic_modules_on_the_emulated_agent_say_they_need_a_gpu(pycuda: Any) -> None:
    compiler = pycuda.compiler
    with pytest.raises(pycuda.driver.Error) as caught:
        compiler.DynamicSourceModule("__global__ void k() { }")
    assert "needs a real GPU" in str(caught.value) and "DynamicModule" in str(caught.value)
    module = compiler.DynamicModule()
    assert module.add_source("__global__ void k() { }", nvcc_options=["-rdc=true"]) is module
    assert module.add_data(b"// ptx", pycuda.driver.jit_input_type.PTX, "x.ptx") is module
    assert module.add_stdlib("cudadevrt") is module
    with pytest.raises(pycuda.driver.Error, match="needs a real GPU"):
        module.link()
    with pytest.raises(pycuda.driver.LogicError, match="nothing was added"):
        compiler.DynamicModule().link()


def test_user_registered_dtypes_travel_with_user_kernels(pycuda: Any) -> None:
    tools = pycuda.tools
    names = [name for name, _ in tools.user_dtypes()]
    assert "float3" not in names and "int2" not in names  # the agent's pycuda has vec's own
    pair = np.dtype([("lo", np.float32), ("hi", np.float32)])
    tools.register_dtype(pair, "harp_test_pair")
    assert ["harp_test_pair", str(pair.descr)] in tools.user_dtypes()
    assert tools.dtype_to_ctype(pair) == "harp_test_pair"
    from gpu_agent import protocol as P

    assert P.registered_dtypes(tools.user_dtypes())[-1] == ("harp_test_pair", pair)


# }}}


# {{{ cuRAND generators: the emulated agent has no cuRAND


def test_curand_generators_on_the_emulated_agent_say_they_need_a_gpu(pycuda: Any) -> None:
    curandom = pycuda.curandom
    assert curandom.get_curand_version() is None  # pycuda's answer without cuRAND
    np.random.seed(5)
    for cls in (curandom.XORWOWRandomNumberGenerator, curandom.MRG32k3aRandomNumberGenerator,
                curandom.Sobol32RandomNumberGenerator,
                curandom.ScrambledSobol64RandomNumberGenerator):
        with pytest.raises(pycuda.driver.Error, match="cuRAND generator needs a real GPU"):
            cls()
    with pytest.raises(pycuda.driver.Error, match="direction vectors"):
        curandom.Sobol32RandomNumberGenerator(dir_vector=pycuda.gpuarray.zeros(3, np.uint32))
    import random

    random.seed(3)
    expected = random.randint(0, 2**31 - 1)
    random.seed(3)
    seeds = curandom.seed_getter_uniform(7).get()  # pycuda draws it from Python's random
    assert seeds.dtype == np.int32 and (seeds == expected).all()


# }}}
