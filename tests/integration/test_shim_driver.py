"""pycuda.driver programs through the in-process shim, against a real emulated agent process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import pytest

from gpu_agent import protocol
from harp_jupyter.shim.session import get_session
from tests.agent_client import RawClient

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda(shim_cuda: ModuleType) -> ModuleType:
    """``pycuda.driver`` as user code sees it, with a context, on a fresh session."""
    return shim_cuda

def line_of_next_statement() -> int:
    return sys._getframe(1).f_lineno + 1


def test_pycuda_names_resolve_to_one_shim_module(cuda: ModuleType) -> None:
    import pycuda
    import pycuda.driver

    import harp_jupyter.shim.pycuda.driver as shim_driver

    assert cuda is pycuda.driver is shim_driver
    assert pycuda.driver is sys.modules["harp_jupyter.shim.pycuda.driver"]
    assert pycuda.VERSION >= (2024, 1)


def test_memcpy_round_trip_small_and_chunked(cuda: ModuleType) -> None:
    for data in (np.arange(1000, dtype=np.float32),
                 np.random.default_rng(1).random(40 << 17)):  # 40 MiB: several chunks
        dev = cuda.mem_alloc(data.nbytes)
        cuda.memcpy_htod(dev, data)
        back = np.empty_like(data)
        cuda.memcpy_dtoh(back, dev)
        assert np.array_equal(back, data)
        dev.free()


@pytest.mark.parametrize("nbytes", [(1 << 20) - 8, 1 << 20, (3 << 20) + 24, 6 << 20])
def test_copies_from_a_mib_go_in_pieces_a_batch_each_and_arrive_whole(
        cuda: ModuleType, nbytes: int) -> None:
    """From ``PIPELINE_MIN_BYTES`` a copy goes as ``copy_pieces``, each piece a batch of its
    own (so the agent copies one while the next is on the wire), both ways, snapshotted (up to
    4 MiB) or zero-copy; below it one call. Every byte arrives in its place."""
    from harp_jupyter.shim.host_copies import PIPELINE_MIN_BYTES, copy_pieces

    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dev = cuda.mem_alloc(nbytes)
    cuda.Context.synchronize()
    session = get_session()
    writer = session.current_writer()
    assert writer is not None
    pieces = len(copy_pieces(nbytes))
    assert (pieces > 1) == (nbytes >= PIPELINE_MIN_BYTES)
    sent = writer.batches_sent
    cuda.memcpy_htod(dev, data)
    cuda.Context.synchronize()
    uploads = writer.batches_sent - sent
    assert uploads == (pieces + 1 if pieces > 1 else 1)  # (the synchronize ends the batch)
    back = np.zeros_like(data)
    sent = writer.batches_sent
    cuda.memcpy_dtoh(back, dev)
    assert writer.batches_sent - sent == pieces
    assert np.array_equal(back, data)
    dev.free()


def test_snapshots_reuse_buffers_only_once_their_batches_were_answered(
        cuda: ModuleType) -> None:
    """A synchronous upload of 64 KiB to 4 MiB is copied into a reused buffer and returns at
    once. Many uploads in a row, the source changed after each, past the buffers' bound: none
    is overwritten by a later one (a buffer is reused only once its batch was answered), and
    the buffers kept stay within their bound."""
    from harp_jupyter.shim.host_copies import SNAPSHOT_STAGING_BYTES

    count, nbytes = 80, 256 << 10
    assert count * nbytes > SNAPSHOT_STAGING_BYTES
    dev = cuda.mem_alloc(count * nbytes)
    source = np.empty(nbytes, np.uint8)
    for i in range(count):
        source[:] = i
        cuda.memcpy_htod(int(dev) + i * nbytes, source)
    source[:] = 255
    back = np.empty(count * nbytes, np.uint8)
    cuda.memcpy_dtoh(back, dev)
    assert (back.reshape(count, nbytes) == np.arange(count, dtype=np.uint8)[:, None]).all()
    assert 0 < get_session()._copies.snapshot_bytes <= SNAPSHOT_STAGING_BYTES
    dev.free()


def test_htod_source_may_change_once_the_call_returns(cuda: ModuleType) -> None:
    data = np.full(1 << 20, 7, dtype=np.int32)  # 4 MiB: a zero-copy frame
    dev = cuda.mem_alloc(data.nbytes)
    cuda.memcpy_htod(dev, data)
    data[:] = -1  # pycuda's synchronous copy promises the buffer is reusable now
    assert (cuda.from_device_like(dev, data) == 7).all()


def test_memset_widths_and_offsets(cuda: ModuleType) -> None:
    dev = cuda.mem_alloc(64)
    cuda.memset_d8(dev, 0, 64)
    cuda.memset_d8(int(dev) + 1, 0xAB, 3)
    cuda.memset_d16(int(dev) + 8, 0x1234, 2)
    cuda.memset_d32(int(dev) + 16, 0xDEADBEEF, 2)
    raw = cuda.from_device(dev, 64, np.uint8)
    assert list(raw[:5]) == [0, 0xAB, 0xAB, 0xAB, 0]
    assert list(raw[8:12].view(np.uint16)) == [0x1234, 0x1234]
    assert list(raw[16:24].view(np.uint32)) == [0xDEADBEEF, 0xDEADBEEF]
    assert not raw[24:].any()


def test_dtod_copies_on_the_device(cuda: ModuleType) -> None:
    data = np.arange(300, dtype=np.int64)
    src = cuda.to_device(data)
    dst = cuda.mem_alloc(data.nbytes)
    cuda.memcpy_dtod(dst, src, data.nbytes)
    cuda.memcpy_dtod(int(dst), int(src) + 8, 8)  # one element, shifted
    back = cuda.from_device_like(dst, data)
    assert back[0] == 1 and np.array_equal(back[1:], data[1:])


def test_streams_events_and_async_copies(cuda: ModuleType) -> None:
    data = np.arange(50_000, dtype=np.float64)  # > the inline limit: a frame
    host = cuda.pagelocked_empty_like(data)
    dev = cuda.mem_alloc(data.nbytes)
    stream = cuda.Stream()
    start, end = cuda.Event(), cuda.Event()
    start.record(stream)
    cuda.memcpy_htod_async(dev, data, stream)
    cuda.memcpy_dtoh_async(host, dev, stream)
    end.record(stream)
    stream.synchronize()
    assert np.array_equal(host, data)
    assert stream.is_done() is True
    assert end.synchronize() is end and end.query() is True
    assert end.time_since(start) >= 0.0 and start.time_till(end) >= 0.0
    other = cuda.Stream()
    other.wait_for_event(end)
    other.synchronize()


def test_mem_get_info_follows_allocations(cuda: ModuleType) -> None:
    free0, total = cuda.mem_get_info()
    assert 0 < free0 <= total
    size = 8 * protocol.GRANULARITY
    block = cuda.mem_alloc(size)
    free1, _ = cuda.mem_get_info()
    assert free1 <= free0 - size
    block.free()
    free2, _ = cuda.mem_get_info()
    assert free2 >= free1 + size


def test_device_queries_come_from_the_agent(cuda: ModuleType) -> None:
    import pycuda.autoinit

    dev = pycuda.autoinit.device
    info = get_session().device
    assert cuda.Device.count() == info.get("count", 1) >= 1
    assert dev.name() == info["name"]
    assert dev.compute_capability() == tuple(info["compute_capability"])
    assert dev.total_memory() == info["total_memory"] > 0
    attributes = dev.get_attributes()
    assert attributes and all(isinstance(k, cuda.device_attribute) for k in attributes)
    attribute, value = next(iter(attributes.items()))
    assert dev.get_attribute(attribute) == value
    assert getattr(dev, attribute.name.lower()) == value
    assert cuda.Context.get_device() == dev
    with pytest.raises(cuda.LogicError):
        cuda.Device(dev.count())


def test_raw_kernel_on_the_emulated_agent_is_not_supported_and_session_survives(
        cuda: ModuleType) -> None:
    from pycuda.compiler import SourceModule

    with pytest.raises(cuda.NotSupportedError) as failure:
        # compiling waits for the agent, so the refusal is raised by this call, as pycuda
        # raises a compile error (issue 12)
        SourceModule("""
        __global__ void double_it(float *a) { a[threadIdx.x] *= 2; }
        """)
    assert "GPU" in str(failure.value)
    assert isinstance(failure.value, cuda.Error)
    dev = cuda.to_device(np.arange(8, dtype=np.int32))  # the session still works
    assert list(cuda.from_device(dev, 8, np.int32)) == list(range(8))


def test_deferred_error_is_raised_at_the_next_sync_point_with_its_call_site(
        cuda: ModuleType) -> None:
    base, size = get_session().address_range
    unmapped = base + size - (1 << 20)
    line = line_of_next_statement()
    cuda.memset_d8(unmapped, 1, 16)  # fire-and-forget: returns at once
    cuda.mem_alloc(256)  # still no sync point
    with pytest.raises(cuda.LogicError) as failure:
        cuda.Context.synchronize()
    message = str(failure.value)
    assert f"{__file__}:{line}" in message and "memset" in message
    assert failure.value.site[:2] == (__file__, line)
    cuda.Context.synchronize()  # reported once; the session goes on


def test_a_lone_sync_read_fails_at_the_users_line_and_the_session_goes_on(
        cuda: ModuleType) -> None:
    """With nothing queued, a synchronous read is a batch of its own straight to its reply;
    its error is still the user's, at the user's line, and an earlier call's error still comes
    first."""
    session = get_session()
    base, size = session.address_range
    unmapped = base + size - (1 << 20)
    host = np.empty(4, np.uint8)
    cuda.Context.synchronize()
    writer = session.current_writer()
    assert writer is not None and writer.inflight == 0 and writer.queued_calls == 0
    sent = writer.batches_sent
    with pytest.raises(cuda.LogicError) as failure:
        line = line_of_next_statement()
        cuda.memcpy_dtoh(host, unmapped)
    assert writer.batches_sent == sent + 1
    assert f"{__file__}:{line}" in str(failure.value) and "dtoh" in str(failure.value)
    assert failure.value.site[:2] == (__file__, line)
    frames = [tb.tb_frame.f_code.co_filename for tb in _entries(failure.value.__traceback__)]
    assert "harp_jupyter" not in "".join(frames[1:]), frames  # no shim frame under the user's

    dev = cuda.to_device(np.arange(4, dtype=np.uint8))
    with pytest.raises(cuda.LogicError, match="memset"):
        cuda.memset_d8(unmapped, 1, 16)  # queued: the read is not alone, this error is first
        cuda.memcpy_dtoh(host, dev)
    cuda.memcpy_dtoh(host, dev)
    assert list(host) == [0, 1, 2, 3]


def test_an_answered_deferred_error_is_raised_by_the_next_lone_sync_read(
        cuda: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fire-and-forget call fails, its reply arrives before any sync point; the next sync
    point is a read with nothing queued (a batch of its own): it raises that error, at the
    failed call's line, once."""
    session = get_session()
    base, size = session.address_range
    unmapped = base + size - (1 << 20)
    dev = cuda.to_device(np.arange(4, dtype=np.uint8))
    cuda.Context.synchronize()
    writer = session.current_writer()
    assert writer is not None
    line = line_of_next_statement()
    cuda.memset_d8(unmapped, 1, 16)  # fire-and-forget: fails on the agent
    writer.drain()  # its batch answered: the error waits for a sync point
    assert writer.inflight == 0 and writer.queued_calls == 0
    sent, syncs = writer.batches_sent, session.sync_points
    alone: list[bool] = []
    call_alone = writer.call_alone

    def noting_call_alone(*args: Any) -> bool:
        alone.append(call_alone(*args))
        return alone[-1]

    monkeypatch.setattr(writer, "call_alone", noting_call_alone)
    host = np.full(4, 9, np.uint8)
    with pytest.raises(cuda.LogicError) as failure:
        cuda.memcpy_dtoh(host, dev)
    assert alone == [True]  # the read went as a batch of its own, straight to its reply
    assert (writer.batches_sent, session.sync_points) == (sent + 1, syncs + 1)
    message = str(failure.value)
    assert f"{__file__}:{line}" in message and "memset" in message
    assert failure.value.site[:2] == (__file__, line)
    # the session, its link and its memory are as they were
    assert not session.lost and session.current_writer() is writer
    back = np.empty(4, np.uint8)
    cuda.memcpy_dtoh(back, dev)  # reported once; the next sync point works
    assert list(back) == [0, 1, 2, 3] and alone == [True, True]


def _entries(tb: Any) -> list[Any]:
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    return entries


def test_out_of_memory_is_pycuda_memory_error_and_the_agent_is_fine(
        cuda: ModuleType, emulated_agent: Any) -> None:
    import pycuda.autoinit

    too_much = pycuda.autoinit.device.total_memory() + protocol.GRANULARITY
    with pytest.raises(cuda.MemoryError) as failure:
        line = line_of_next_statement()
        cuda.mem_alloc(too_much)
    assert f"{__file__}:{line}" in str(failure.value)
    dev = cuda.to_device(np.arange(10, dtype=np.float32))  # this session goes on
    assert cuda.from_device(dev, 10, np.float32)[9] == 9
    other = RawClient(emulated_agent.endpoint)  # and the agent answers others
    try:
        assert other.status()["leases"]["slots"] == 1
    finally:
        other.close()
    assert emulated_agent.process.poll() is None


def test_a_long_fire_and_forget_loop_keeps_client_memory_bounded(cuda: ModuleType) -> None:
    dev = cuda.mem_alloc(1024)
    process = psutil.Process()
    cuda.memset_d8(dev, 0, 1024)
    cuda.Context.synchronize()
    rss_before = process.memory_info().rss
    for i in range(200_000):
        cuda.memset_d8(dev, i & 0xFF, 4)
    cuda.Context.synchronize()
    growth = process.memory_info().rss - rss_before
    writer = get_session()._writer
    assert writer is not None
    assert writer.peak_queued_calls <= protocol.MAX_CALLS_PER_BATCH
    assert writer.peak_inflight <= protocol.MAX_INFLIGHT_BATCHES
    # 200k queued calls would take well over 50 MiB; bounded queues take a few
    assert growth < 32 << 20, f"client RSS grew by {growth >> 20} MiB"
    assert cuda.from_device(dev, 4, np.uint8)[0] == (199_999 & 0xFF)


def test_kernel_arguments_are_packed_as_pycuda_packs_them(cuda: ModuleType) -> None:
    from harp_jupyter.shim.pycuda import _kernel_args

    dev = cuda.mem_alloc(16)
    record = np.zeros(1, dtype=[("a", np.int8), ("b", np.float64)])[0]
    handlers, buf = _kernel_args.build_arg_buf(
        [np.int8(1), dev, np.float64(2.5), np.complex64(1 + 2j), record],
        (cuda.DeviceAllocation, cuda.PointerHolderBase), cuda.ArgumentHandler,
        cuda.ArgumentHandler.get_device_alloc)
    assert handlers == []
    # native alignment: int8 at 0, pointer at 8, double at 16, complex64 at 24, struct bytes
    assert buf[0] == 1 and int.from_bytes(buf[8:16], "little") == int(dev)
    assert np.frombuffer(buf[16:24], np.float64)[0] == 2.5
    assert np.frombuffer(buf[24:32], np.complex64)[0] == 1 + 2j
    assert len(buf) == 32 + record.itemsize
    with pytest.raises(TypeError, match="parameter #0"):
        _kernel_args.build_arg_buf([5], (cuda.DeviceAllocation,), cuda.ArgumentHandler,
                                   cuda.ArgumentHandler.get_device_alloc)


def test_a_refused_launch_is_reported_at_the_users_line_on_each_launch_path(
        cuda: ModuleType) -> None:
    # the emulated agent refuses raw kernels when they run: a stand-in kernel (a handle the
    # agent never made) shows where the shim says a launch was made
    session = get_session()
    kernel = cuda.Function(cuda.Module(session, session.new_handle()), session.new_handle(), "k")
    dev = cuda.mem_alloc(64)
    stream = cuda.Stream()
    kernel.prepare("Pi")
    for path in ("__call__", "prepared_call", "prepared_async_call"):
        if path == "__call__":
            line = line_of_next_statement()
            kernel(dev, np.int32(3), block=(32, 1, 1), grid=(2, 1))
        elif path == "prepared_call":
            line = line_of_next_statement()
            kernel.prepared_call((2, 1), (32, 1, 1), dev, 3)
        else:
            line = line_of_next_statement()
            kernel.prepared_async_call((2, 1), (32, 1, 1), stream, dev, 3)
        with pytest.raises(cuda.NotSupportedError) as failure:
            cuda.Context.synchronize()
        assert failure.value.site[:2] == (__file__, line), path
        assert "launch" in str(failure.value) and f"{__file__}:{line}" in str(failure.value)


def test_launch_argument_mistakes_are_pycudas_errors(cuda: ModuleType) -> None:
    import struct

    session = get_session()
    kernel = cuda.Function(cuda.Module(session, session.new_handle()), session.new_handle(), "k")
    dev = cuda.mem_alloc(64)
    with pytest.raises(ValueError, match="extra keyword arguments: blocks"):
        kernel(dev, blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="must specify block size"):
        kernel(dev, grid=(1, 1))
    with pytest.raises(TypeError, match="parameter #1"):
        kernel(dev, 3, block=(1, 1, 1))
    with pytest.raises(AttributeError, match="arg_format"):
        kernel.prepared_call((1, 1), (1, 1, 1), dev)
    kernel.prepare([np.intp])
    kernel.arg_format = "PiD"  # set by hand, as pycuda allows: the prepared calls follow it
    with pytest.raises(struct.error):
        kernel.prepared_call((1, 1), (1, 1, 1), dev)
    with pytest.raises(ValueError, match="block size as a tuple"):
        kernel.prepared_call((1, 1), 32, dev, 1, 2j)
    cuda.Context.synchronize()  # none of them was queued: the stand-in's refusal would raise


def _python(code: str, tmp_path: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_real_pycuda_is_shadowed_while_active_and_restored_after(tmp_path: Path) -> None:
    fake = tmp_path / "pycuda"  # stands for a pycuda installed in the same environment
    fake.mkdir()
    (fake / "__init__.py").write_text("LOCAL = True\n")
    (fake / "driver.py").write_text("LOCAL = True\n")
    out = _python(
        "import pycuda, pycuda.driver\n"
        "print('before', pycuda.driver.LOCAL)\n"
        "from harp_jupyter import shim\n"
        "shim.activate()\n"
        "import pycuda, pycuda.driver\n"
        "print('active', hasattr(pycuda.driver, 'LOCAL'), pycuda.driver.__name__)\n"
        "shim.deactivate()\n"
        "import pycuda.driver\n"
        "print('after', pycuda.driver.LOCAL)\n", tmp_path)
    assert out.split("\n")[:3] == [
        "before True", "active False harp_jupyter.shim.pycuda.driver", "after True"]


def test_harp_shim_env_activates_any_python_process(tmp_path: Path, emulated_agent: Any) -> None:
    pth_line = (REPO / "harp_jupyter" / "shim" / "harp_shim.pth").read_text().strip()
    assert pth_line.startswith("import ")  # site.py executes such .pth lines at start-up
    program = (f"{pth_line}\n"
               "import pycuda.autoinit, pycuda.driver as cuda\n"
               "print(cuda.__name__, cuda.mem_get_info()[1] > 0)\n")
    out = _python(program, tmp_path, HARP_SHIM="1", HARP_AGENT=emulated_agent.endpoint)
    assert out.strip() == "harp_jupyter.shim.pycuda.driver True"
    plain = _python(f"{pth_line}\nimport sys\nprint('harp_jupyter' in sys.modules)\n", tmp_path)
    assert plain.strip() == "False"  # without HARP_SHIM=1 nothing of ours is imported


def test_garbage_collected_allocations_are_freed_on_the_agent(cuda: ModuleType) -> None:
    import gc

    size = 8 * protocol.GRANULARITY
    free_before, _ = cuda.mem_get_info()
    block = cuda.mem_alloc(size)
    assert cuda.mem_get_info()[0] <= free_before - size
    del block
    gc.collect()
    assert cuda.mem_get_info()[0] >= free_before  # the free went out with the next call
    explicit = cuda.mem_alloc(size)
    explicit.free()
    with pytest.raises(cuda.LogicError):  # as in pycuda
        explicit.free()
    assert cuda.mem_get_info()[0] >= free_before


def test_prepared_formats_and_host_helpers(cuda: ModuleType) -> None:
    from harp_jupyter.shim.pycuda import _kernel_args

    pair = np.dtype([("x", np.float32), ("y", np.float32)])
    fmt = _kernel_args.format_for_types([np.intp, np.int32, "P", pair, np.complex128, object])
    assert fmt == np.dtype(np.intp).char + "iP8sD" + np.dtype(np.uintp).char
    packed = _kernel_args.pack("iD", 7, 1.5 - 2j)
    assert len(packed) == 24 == _kernel_args.calcsize("iD")  # complex128 aligned to 8
    assert np.frombuffer(packed[8:], np.complex128)[0] == 1.5 - 2j
    aligned = cuda.aligned_zeros((3, 5), np.float64, alignment=4096)
    assert aligned.ctypes.data % 4096 == 0 and aligned.shape == (3, 5) and not aligned.any()
    host = cuda.pagelocked_zeros_like(np.ones((2, 3), order="F"))
    assert host.flags.f_contiguous and host.shape == (2, 3)


def test_async_copies_go_whole_in_the_batch_they_join(cuda: ModuleType) -> None:
    """An asynchronous copy is not cut into pieces: the caller does not wait for it, and under
    a network's delay every extra batch costs round trips (at most 8 are in flight). A 3 MiB
    ``memcpy_htod_async`` ends its batch as one call; a ``memcpy_dtoh_async`` of the same size
    rides in the batch of the calls around it; the bytes arrive by the next sync point."""
    from harp_jupyter.shim.host_copies import ASYNC_CHUNK_BYTES, PIPELINE_MIN_BYTES

    nbytes = 3 << 20
    assert PIPELINE_MIN_BYTES <= nbytes < ASYNC_CHUNK_BYTES
    data = cuda.pagelocked_empty(nbytes, np.uint8)
    data[:] = np.random.default_rng(3).integers(0, 256, nbytes, dtype=np.uint8)
    back = cuda.pagelocked_zeros(nbytes, np.uint8)
    dev = cuda.mem_alloc(nbytes)
    stream = cuda.Stream()
    stream.synchronize()
    writer = get_session().current_writer()
    assert writer is not None
    sent = writer.batches_sent
    cuda.memcpy_htod_async(dev, data, stream)
    assert writer.batches_sent - sent == 1
    sent = writer.batches_sent
    cuda.memcpy_dtoh_async(back, dev, stream)
    stream.synchronize()
    assert writer.batches_sent - sent == 1  # the dtoh rode in the synchronize's batch
    assert np.array_equal(back, data)
    dev.free()
