"""gpu_agent.datastore: safe paths in the data root, listings, .npy/.npz/raw layouts, saving."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpu_agent.datastore import (
    DataError,
    DataStore,
    npy_header,
    parse_npy_header,
    read_exactly,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    np.save(data / "train" / "x.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
    np.save(tmp_path / "secret.npy", np.arange(3))
    return data


def code_of(store: DataStore, path: str) -> str:
    with pytest.raises(DataError) as caught, store.open_file(path):
        pass
    return caught.value.code


def read_array(store: DataStore, path: str, spec: dict | None = None) -> np.ndarray:
    layout = store.describe(path, spec or {})
    buffer = bytearray(layout.nbytes)
    with store.open_for_read(path, layout.identity) as opened:
        read_exactly(opened.fd, memoryview(buffer), layout.offset, path)
    flat = np.frombuffer(bytes(buffer), layout.dtype)
    return flat.reshape(layout.shape, order="F" if layout.fortran_order else "C")


@pytest.mark.parametrize(("path", "code"), [
    ("../secret.npy", "BAD_PATH"),
    ("train/../../secret.npy", "BAD_PATH"),
    ("/etc/passwd", "BAD_PATH"),
    ("nul\x00.npy", "BAD_PATH"),
    ("missing.npy", "NOT_FOUND"),
    ("train", "NOT_A_FILE"),
    ("", "NOT_A_FILE"),
    ("train/x.npy/deeper", "NOT_A_DIRECTORY"),
])
def test_bad_paths_are_refused_with_a_code(root: Path, path: str, code: str) -> None:
    assert code_of(DataStore(root), path) == code


def test_links_are_followed_only_inside_the_root(root: Path) -> None:
    (root / "up").symlink_to("..")
    (root / "abs_out").symlink_to(root.parent / "secret.npy")
    (root / "rel_out").symlink_to("train/../../secret.npy")
    (root / "dev").symlink_to("/dev/zero")
    (root / "inside").symlink_to("train/x.npy")
    (root / "train" / "back").symlink_to("../train")
    (root / "abs_in").symlink_to(root / "train")
    (root / "loop").symlink_to("loop")
    store = DataStore(root)
    for path in ("up/secret.npy", "abs_out", "rel_out", "dev"):
        assert code_of(store, path) == "OUTSIDE_ROOT", path
    assert code_of(store, "loop") == "BAD_PATH"
    for path in ("inside", "train/back/x.npy", "abs_in/x.npy", "train/back/back/x.npy"):
        assert np.array_equal(read_array(store, path), np.arange(6).reshape(2, 3)), path


def test_a_root_given_through_a_link_is_its_real_path(root: Path, tmp_path: Path) -> None:
    (tmp_path / "via").symlink_to(root)
    store = DataStore(tmp_path / "via")
    assert store.root == os.path.realpath(root)
    (root / "abs").symlink_to(Path(store.root) / "train" / "x.npy")
    assert read_array(store, "abs").shape == (2, 3)


def test_special_files_are_refused_before_opening(root: Path) -> None:
    os.mkfifo(root / "fifo")  # opening a FIFO for reading would block: it is never opened
    store = DataStore(root)
    assert code_of(store, "fifo") == "NOT_A_FILE"
    try:
        os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        return
    assert code_of(store, "null") == "NOT_A_FILE"


def test_no_root_serves_nothing() -> None:
    store = DataStore()
    with pytest.raises(DataError) as caught:
        store.listing("")
    assert caught.value.code == "NO_DATA_ROOT" and "--data-root" in str(caught.value)
    assert store.info() == {"root": None, "writable": False}


def test_listing_shows_arrays_and_hides_what_is_not_served(root: Path) -> None:
    np.save(root / "f.npy", np.zeros((4, 5), np.float16, order="F"))
    (root / "bad.npy").write_bytes(b"junk")
    (root / "out").symlink_to("/etc")
    (root / "broken").symlink_to("nowhere")
    (root / ".harp-tmp-1234-half.npy").write_bytes(b"")
    os.mkfifo(root / "fifo")
    entries = {e["name"]: e for e in DataStore(root).listing()}
    assert set(entries) == {"bad.npy", "f.npy", "train"}
    assert entries["f.npy"]["shape"] == [4, 5] and entries["f.npy"]["order"] == "F"
    assert entries["f.npy"]["dtype"] == "<f2"
    assert "not a .npy file" in entries["bad.npy"]["error"]
    assert entries["train"] == {"name": "train", "path": "train", "type": "dir"}
    (x,) = DataStore(root).listing("train")
    assert x["path"] == "train/x.npy" and x["shape"] == [2, 3]


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("array", [
    np.arange(12, dtype=">i4").reshape(3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.array(7, dtype=np.uint64),
    np.zeros((0, 3), np.complex64),
])
def test_npy_headers_of_every_version(root: Path, version: tuple[int, int],
                                      array: np.ndarray) -> None:
    with open(root / "a.npy", "wb") as f:
        np.lib.format.write_array(f, array, version=version)
    store = DataStore(root)
    layout = store.describe("a.npy", {})
    assert (layout.dtype, layout.shape) == (array.dtype, array.shape)
    assert layout.fortran_order == (array.flags.f_contiguous and not array.flags.c_contiguous
                                    and array.ndim > 1)
    assert np.array_equal(read_array(store, "a.npy"), array)


def test_written_headers_parse_back() -> None:
    for dtype, shape, fortran in ((np.dtype("<f4"), (3, 4), False),
                                  (np.dtype("|b1"), (), False),
                                  (np.dtype("<c16"), (2, 3, 4), True)):
        header = npy_header(dtype, shape, fortran)
        assert len(header) % 64 == 0
        assert parse_npy_header(header, "x") == (dtype, shape, fortran, len(header))


@pytest.mark.parametrize(("content", "code", "words"), [
    (b"\x93NUMPY\x01\x00\x10\x00{'descr'", "TRUNCATED", "cut short"),
    (b"\x93NUMPY\x09\x00" + b" " * 10, "BAD_FORMAT", "version 9"),
    (b"\x93NUMPY\x01\x00\x0a\x00__import__", "BAD_FORMAT", "literal"),
    (b"\x93NUMPY\x01\x00\x1f\x00{'descr': '<f4', 'shape': (1,)}", "BAD_FORMAT", "exactly"),
    (b"PK\x03\x04 not a zip", "BAD_FORMAT", "not a valid .npz"),
])
def test_malformed_files(root: Path, content: bytes, code: str, words: str) -> None:
    (root / "m.npy").write_bytes(content)
    with pytest.raises(DataError) as caught:
        DataStore(root).describe("m.npy", {})
    assert caught.value.code == code and words in str(caught.value)


@pytest.mark.parametrize(("array", "words"), [
    (np.array([1, "a"], dtype=object), "object arrays"),
    (np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), "not supported"),
    (np.array(["abc"]), "not supported"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "not supported"),
])
def test_dtypes_a_gpuarray_cannot_hold_are_refused(root: Path, array: np.ndarray,
                                                   words: str) -> None:
    np.save(root / "d.npy", array, allow_pickle=True)
    with pytest.raises(DataError, match=words):
        DataStore(root).describe("d.npy", {})


def test_truncated_data(root: Path) -> None:
    whole = (root / "train" / "x.npy").read_bytes()
    (root / "t.npy").write_bytes(whole[:-1])
    with pytest.raises(DataError) as caught:
        DataStore(root).describe("t.npy", {})
    assert caught.value.code == "TRUNCATED" and "promises 24 bytes" in str(caught.value)


def test_npz_stored_members_are_located_in_place(root: Path) -> None:
    arrays = {"a": np.arange(10.0), "b": np.ones((3, 3), np.int8, order="F")}
    np.savez(root / "s.npz", **arrays)
    store = DataStore(root)
    assert store.open_request("s.npz", {})["members"] == ["a", "b"]
    for key, array in arrays.items():
        assert np.array_equal(read_array(store, "s.npz", {"format": "npz", "key": key}), array)
    with pytest.raises(DataError, match="has no array 'c'"):
        store.describe("s.npz", {"format": "npz", "key": "c"})
    np.savez_compressed(root / "c.npz", a=np.arange(3))
    with pytest.raises(DataError) as caught:
        store.describe("c.npz", {"format": "npz", "key": "a"})
    assert caught.value.code == "NOT_SUPPORTED"
    with zipfile.ZipFile(root / "s.npz") as archive:
        assert archive.getinfo("a.npy").compress_type == zipfile.ZIP_STORED


def test_raw_layouts(root: Path) -> None:
    (root / "r.bin").write_bytes(bytes(range(100)))
    store = DataStore(root)
    layout = store.describe("r.bin", {"format": "raw", "dtype": "<u2", "shape": [7, 2],
                                      "offset": 4, "order": "F"})
    assert layout.strides == (2, 14) and layout.nbytes == 28 and layout.offset == 4
    for spec, code in (({"dtype": "<u2", "shape": [60]}, "TRUNCATED"),
                       ({"dtype": "nonsense", "shape": [1]}, "BAD_FORMAT"),
                       ({"shape": [1]}, "BAD_FORMAT"),
                       ({"dtype": "<u2", "shape": [-1]}, "BAD_FORMAT"),
                       ({"dtype": "<u2", "shape": [1], "offset": -3}, "BAD_FORMAT"),
                       ({"dtype": "<u2", "shape": [1], "order": "K"}, "BAD_FORMAT")):
        with pytest.raises(DataError) as caught:
            store.describe("r.bin", {"format": "raw", **spec})
        assert caught.value.code == code, spec


def test_a_file_replaced_after_describing_is_refused(root: Path) -> None:
    store = DataStore(root)
    layout = store.describe("train/x.npy", {})
    np.save(root / "train" / "x.npy", np.arange(7))
    with pytest.raises(DataError) as caught, store.open_for_read("train/x.npy", layout.identity):
        pass
    assert caught.value.code == "CHANGED"


def test_create_writes_atomically_and_only_where_allowed(root: Path) -> None:
    with pytest.raises(DataError) as caught, DataStore(root).create("o.bin"):
        pass
    assert caught.value.code == "READ_ONLY"
    store = DataStore(root, writable=True)
    with store.create("train/o.bin") as fd:
        os.write(fd, b"new")
    assert (root / "train" / "o.bin").read_bytes() == b"new"
    with pytest.raises(DataError) as caught, store.create("train/o.bin", overwrite=False):
        pass
    assert caught.value.code == "EXISTS"
    with pytest.raises(RuntimeError), store.create("train/o.bin") as fd:
        os.write(fd, b"half")
        raise RuntimeError("the device copy failed")
    assert (root / "train" / "o.bin").read_bytes() == b"new"  # untouched, no temp file left
    assert sorted(p.name for p in (root / "train").iterdir()) == ["o.bin", "x.npy"]
    (root / "link.npy").symlink_to(root.parent / "secret.npy")
    with store.create("link.npy") as fd:  # replaces the link, never writes through it
        os.write(fd, b"mine")
    assert np.array_equal(np.load(root.parent / "secret.npy"), np.arange(3))
    assert not (root / "link.npy").is_symlink()
    (root / "out").symlink_to(root.parent)
    for path, code in (("out/x.npy", "OUTSIDE_ROOT"), ("../x.npy", "BAD_PATH"),
                       ("train", "NOT_A_FILE"), ("nodir/x.npy", "NOT_FOUND")):
        with pytest.raises(DataError) as caught, store.create(path):
            pass
        assert caught.value.code == code, path
