"""harp_jupyter.remote against real emulated agents serving a data root: files go from the agent's
disk into its device memory and back, refusals are clear errors, and after each the agent serves
and the session works."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_agent import protocol as P
from harp_jupyter import remote
from harp_jupyter.shim.errors import MemoryError
from harp_jupyter.shim.session import get_session
from tests.agent_client import RawClient, result_bytes

pytestmark = pytest.mark.timeout(60)

ARRAYS: dict[str, np.ndarray] = {
    "f32_matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64_fortran": np.asfortranarray(np.linspace(0, 1, 30).reshape(5, 6)),
    "i16_3d": np.arange(-60, 60, dtype=np.int16).reshape(2, 3, 20),
    "u8_large": (np.arange(3_000_000) % 251).astype(np.uint8),
    "bool": np.arange(17) % 3 == 0,
    "c64": (np.arange(8) + 1j * np.arange(8)).astype(np.complex64),
    "f16_scalar": np.array(2.5, dtype=np.float16),
    "i64_empty": np.zeros((0, 4), dtype=np.int64),
}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    np.save(root / "train" / "images.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    return root


@pytest.fixture
def served(agent_starter: Callable[..., Any], data_root: Path,
           shim_at: Callable[[str], Any]) -> Iterator[tuple[Any, Path]]:
    """The shim on an emulated agent that serves ``data_root`` read-write."""
    agent = agent_starter("--data-root", str(data_root), "--data-writable")
    with shim_at(agent.endpoint):
        yield agent, data_root


def gpuarray() -> Any:
    return importlib.import_module("pycuda.gpuarray")


def still_works() -> None:
    """The session and the agent keep working after a refusal."""
    assert np.array_equal(remote.load("train/images.npy").get(),
                          np.arange(24, dtype=np.float32).reshape(2, 3, 4))


def test_ls_lists_the_data_root_with_array_headers(served: tuple[Any, Path]) -> None:
    _, root = served
    np.savez(root / "pair.npz", a=np.arange(3))
    (root / "notes.txt").write_text("hello")
    entries = remote.ls()
    assert [(e["name"], e["type"]) for e in entries] == [
        ("notes.txt", "file"), ("pair.npz", "file"), ("train", "dir")]
    (images,) = remote.ls("train")
    assert images == {"name": "images.npy", "path": "train/images.npy", "type": "file",
                      "size": os.path.getsize(root / "train" / "images.npy"), "format": "npy",
                      "dtype": "<f4", "shape": [2, 3, 4], "order": "C"}
    assert remote.ls("train/images.npy") == [images]


def test_info_says_which_reader_is_in_use(served: tuple[Any, Path]) -> None:
    _, root = served
    info = remote.info()
    assert info["root"] == os.path.realpath(root) and info["writable"] is True
    assert info["reader"] == "host"  # the emulated device reads into its host memory


@pytest.mark.parametrize("name", list(ARRAYS))
def test_save_then_load_round_trips(served: tuple[Any, Path], name: str) -> None:
    _, root = served
    host = ARRAYS[name]
    device = gpuarray().to_gpu(host)
    written = remote.save(device, f"out_{name}.npy")
    on_disk = np.load(root / f"out_{name}.npy")  # what the agent wrote is a real .npy file
    assert written == os.path.getsize(root / f"out_{name}.npy")
    assert on_disk.dtype == host.dtype and on_disk.shape == host.shape
    assert np.array_equal(on_disk, host)
    assert on_disk.strides == host.strides or not host.size  # written in the array's order
    loaded = remote.load(f"out_{name}.npy")
    assert loaded.dtype == host.dtype and loaded.shape == host.shape
    assert loaded.strides == host.strides or not host.size  # Fortran order honoured
    assert np.array_equal(loaded.get(), host)


def test_numpy_written_files_load_and_results_are_ordinary_arrays(
        served: tuple[Any, Path]) -> None:
    _, root = served
    host = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    np.save(root / "x.npy", host)
    x = remote.load("x.npy")
    y = (x * 2 + 1).get()  # an array operation on the loaded array, on the agent
    np.testing.assert_allclose(y, host * 2 + 1)


def test_a_non_contiguous_array_is_saved_as_its_values(served: tuple[Any, Path]) -> None:
    _, root = served
    host = np.arange(40, dtype=np.int32).reshape(5, 8)
    view = gpuarray().to_gpu(host).transpose()
    remote.save(view, "t.npy")
    assert np.array_equal(np.load(root / "t.npy"), host.T)


def test_npz_loads_every_array_or_one(served: tuple[Any, Path]) -> None:
    _, root = served
    np.savez(root / "set.npz", images=np.arange(6.0).reshape(2, 3), labels=np.arange(2))
    both = remote.load("set.npz")
    assert set(both) == {"images", "labels"}
    assert np.array_equal(both["images"].get(), np.arange(6.0).reshape(2, 3))
    assert np.array_equal(remote.load("set.npz", key="labels").get(), np.arange(2))
    with pytest.raises(remote.RemoteFileNotFoundError, match=r"has no array 'nope'.*images"):
        remote.load("set.npz", key="nope")
    np.savez_compressed(root / "packed.npz", a=np.arange(4))
    with pytest.raises(remote.RemoteFormatError, match="compressed"):
        remote.load("packed.npz", key="a")
    still_works()


def test_raw_binary_with_offset_and_order(served: tuple[Any, Path]) -> None:
    _, root = served
    values = np.arange(100, dtype="<f8")
    (root / "raw.bin").write_bytes(b"HEADER16........" + values.tobytes())
    a = remote.load_raw("raw.bin", np.float64, (10, 10), offset=16)
    assert np.array_equal(a.get(), values.reshape(10, 10))
    f = remote.load_raw("raw.bin", "<f8", (10, 10), offset=16, order="F")
    assert np.array_equal(f.get(), values.reshape(10, 10, order="F"))
    with pytest.raises(remote.RemoteFormatError, match="too short"):
        remote.load_raw("raw.bin", np.float64, (11, 10), offset=16)
    remote.save(a, "raw_out.bin")
    assert (root / "raw_out.bin").read_bytes() == values.tobytes()
    still_works()


@pytest.mark.parametrize(("make", "path", "error", "match"), [
    (None, "../outside.npy", remote.RemotePathRefusedError, "'..' is refused"),
    (None, "train/../../outside.npy", remote.RemotePathRefusedError, "'..' is refused"),
    (None, "/etc/passwd", remote.RemotePathRefusedError, "absolute paths are refused"),
    ("link_out", "escape.npy", remote.RemotePathRefusedError, "outside the agent's data root"),
    ("link_dir_out", "escdir/outside.npy", remote.RemotePathRefusedError, "outside"),
    ("link_relative_out", "rel.npy", remote.RemotePathRefusedError, "outside"),
    ("fifo", "pipe.npy", remote.RemotePathRefusedError, "not a regular file"),
    ("link_device", "null.npy", remote.RemotePathRefusedError, "outside"),
    (None, "train", remote.RemotePathRefusedError, "is a directory"),
    (None, "missing.npy", remote.RemoteFileNotFoundError, "no such file"),
    (None, "train/missing/deeper.npy", remote.RemoteFileNotFoundError, "no such file"),
])
def test_refusals_are_clear_and_leave_the_session_usable(
        served: tuple[Any, Path], make: str | None, path: str, error: type[Exception],
        match: str) -> None:
    _, root = served
    outside = root.parent / "outside.npy"
    np.save(outside, np.arange(3))
    if make == "link_out":
        (root / "escape.npy").symlink_to(outside)
    elif make == "link_dir_out":
        (root / "escdir").symlink_to(root.parent)
    elif make == "link_relative_out":
        (root / "rel.npy").symlink_to("train/../../outside.npy")
    elif make == "fifo":
        os.mkfifo(root / "pipe.npy")
    elif make == "link_device":
        (root / "null.npy").symlink_to("/dev/null")
    with pytest.raises(error, match=match) as caught:
        remote.load(path)
    assert isinstance(caught.value, remote.RemoteDataError) and caught.value.kind == "DataError"
    assert "test_remote_data.py" in str(caught.value)  # names the user's line, not remote.py
    still_works()


def test_links_that_stay_inside_the_root_are_followed(served: tuple[Any, Path]) -> None:
    _, root = served
    (root / "latest").symlink_to("train")
    (root / "abs.npy").symlink_to(root / "train" / "images.npy")
    expected = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(remote.load("latest/images.npy").get(), expected)
    assert np.array_equal(remote.load("abs.npy").get(), expected)
    (root / "loop").symlink_to("loop")
    with pytest.raises(remote.RemotePathRefusedError, match="too many levels"):
        remote.load("loop")
    assert {e["name"] for e in remote.ls()} == {"abs.npy", "latest", "train"}  # loop left out


def test_truncated_and_malformed_files(served: tuple[Any, Path]) -> None:
    _, root = served
    good = (root / "train" / "images.npy").read_bytes()
    (root / "short.npy").write_bytes(good[:-10])
    with pytest.raises(remote.RemoteFormatError, match=r"truncated.*promises 96 bytes"):
        remote.load("short.npy")
    (root / "header.npy").write_bytes(good[:40])
    with pytest.raises(remote.RemoteFormatError, match="header is cut short"):
        remote.load("header.npy")
    (root / "text.npy").write_text("not numpy at all")
    with pytest.raises(remote.RemoteFormatError, match=r"not a .npy file"):
        remote.load("text.npy")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(remote.RemoteFormatError, match="object arrays"):
        remote.load("objects.npy")
    still_works()


def test_saving_refusals(served: tuple[Any, Path]) -> None:
    _, root = served
    a = gpuarray().to_gpu(np.arange(4))
    remote.save(a, "once.npy")
    with pytest.raises(remote.RemoteFileExistsError):
        remote.save(a, "once.npy", overwrite=False)
    with pytest.raises(remote.RemotePathRefusedError):
        remote.save(a, "../escape.npy")
    (root / "out_link").symlink_to(root.parent)
    with pytest.raises(remote.RemotePathRefusedError, match="outside"):
        remote.save(a, "out_link/escape.npy")
    assert not (root.parent / "escape.npy").exists()
    with pytest.raises(remote.RemoteFileNotFoundError):
        remote.save(a, "no_such_dir/x.npy")
    assert not [p for p in root.iterdir() if p.name.startswith(".harp-tmp")]
    still_works()


def test_read_only_root_refuses_saving(agent_starter: Callable[..., Any], data_root: Path,
                                       shim_at: Callable[[str], Any]) -> None:
    agent = agent_starter("--data-root", str(data_root))
    with shim_at(agent.endpoint):
        with pytest.raises(remote.RemotePathRefusedError, match="read-only"):
            remote.save(gpuarray().to_gpu(np.arange(3)), "x.npy")
        assert not (data_root / "x.npy").exists()
        still_works()


def test_an_agent_without_a_data_root_says_so(emulated_agent: Any,
                                              shim_at: Callable[[str], Any]) -> None:
    with shim_at(emulated_agent.endpoint):
        with pytest.raises(remote.RemotePathRefusedError, match="--data-root"):
            remote.ls()
        assert remote.info()["root"] is None
        assert np.array_equal(gpuarray().to_gpu(np.arange(3)).get(), np.arange(3))


def test_a_file_larger_than_free_device_memory_is_a_clear_memory_error(
        agent_starter: Callable[..., Any], data_root: Path,
        shim_at: Callable[[str], Any]) -> None:
    header = np.lib.format
    with open(data_root / "huge.npy", "wb") as f:  # sparse: 1 GiB that takes no disk
        header.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                          "shape": (1 << 30,)})
        f.truncate(f.tell() + (1 << 30))
    agent = agent_starter("--data-root", str(data_root), "--emulated-memory", "256MiB")
    with shim_at(agent.endpoint):
        with pytest.raises(MemoryError, match=r"needs 1\.0 GiB of device memory"):
            remote.load("huge.npy")
        free, total = get_session().mem_get_info()
        assert free == total  # nothing of it stayed allocated
        still_works()
        assert agent.process.poll() is None


def test_loaded_arrays_park_and_restore_like_any_other(served: tuple[Any, Path]) -> None:
    _, root = served
    host = np.arange(500_000, dtype=np.float64)
    np.save(root / "big.npy", host)
    a = remote.load("big.npy")
    pointer = int(a.gpudata)
    session = get_session()
    assert session.release()["bytes"] >= host.nbytes  # parked with the session
    assert np.array_equal(a.get(), host)  # the next GPU call restores it
    assert int(a.gpudata) == pointer and session.restores == 1


def test_load_without_a_lease_acquires_one(served: tuple[Any, Path]) -> None:
    session = get_session()
    session.release()
    assert not session.connected
    assert remote.ls("train")[0]["name"] == "images.npy"
    assert session.connected


def test_a_file_changed_between_open_and_read_is_refused_and_freed(
        served: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, root = served
    np.save(root / "moving.npy", np.arange(10))
    session = get_session()
    real_call_sync = session.call_sync

    def open_then_replace(op: str, *args: Any) -> Any:
        value = real_call_sync(op, *args)
        if op == "data_open":
            np.save(root / "moving.npy", np.arange(20))
        return value

    monkeypatch.setattr(session, "call_sync", open_then_replace)
    with pytest.raises(remote.RemoteFormatError, match="changed on the agent"):
        remote.load("moving.npy")
    monkeypatch.undo()
    assert np.array_equal(remote.load("moving.npy").get(), np.arange(20))


def test_raw_protocol_data_calls_are_checked(agent_starter: Callable[..., Any],
                                             data_root: Path) -> None:
    """What the shim never sends: reads into unmapped memory, writes from it, bad specs."""
    agent = agent_starter("--data-root", str(data_root), "--data-writable")
    client = RawClient(agent.endpoint)
    frames: list[Any] = []

    def request(header: dict[str, Any]) -> dict[str, Any]:
        if header["t"] == P.BATCH:
            reply, frames[:] = client.batch(*header["c"])
            return reply
        return client.request(header)[0]

    try:
        base = client.hello()["range"][0]
        layout = request({"t": P.BATCH, "q": 1, "c": [
            ["data_open", "train/images.npy", {}]]})["r"][0][1]
        read = ["data_read", base, "train/images.npy", layout["offset"], 96, layout["file"]]
        reply = request({"t": P.BATCH, "q": 2, "c": [read]})
        assert reply["e"]["kind"] == "HandleError"  # nothing mapped there: refused, not read
        reply = request({"t": P.BATCH, "q": 3, "c": [
            ["alloc", base, P.GRANULARITY], read,
            ["data_read", base, "train/images.npy", 0, 96, "0:0:0:0"],
            ["mem_get_info"], ["synchronize"], ["dtoh", base, 96, None]]})
        assert reply["e"]["kind"] == "DataError" and reply["e"]["code"] == "CHANGED"
        assert [i for i, _ in reply["r"]] == [1, 3, 4, 5]  # the other calls ran
        assert np.array_equal(np.frombuffer(result_bytes(reply, frames, 5), np.float32),
                              np.arange(24, dtype=np.float32))
        reply = request({"t": P.BATCH, "q": 4, "c": [
            ["data_write", [base + P.GRANULARITY, "<f4", [4], [4]], "w.npy", {}]]})
        assert reply["e"]["kind"] == "HandleError" and not (data_root / "w.npy").exists()
        reply = request({"t": P.BATCH, "q": 5, "c": [
            ["data_open", "train/images.npy", {"format": "raw", "dtype": "O", "shape": [1]}]]})
        assert reply["e"]["code"] == "BAD_FORMAT" and "object arrays" in reply["e"]["msg"]
        status = request({"t": P.STATUS})
        assert status["data"]["reader"] == "host" and status["data"]["writable"] is True
    finally:
        client.close()
