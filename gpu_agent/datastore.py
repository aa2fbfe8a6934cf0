"""The agent's data tree: the one directory it serves to notebooks, and the layout of arrays in it.

``harp-agent --data-root DIR [--data-writable]`` names the tree. Notebooks name files in it by
relative, ``/``-separated paths (``"train/images.npy"``). This module does no device work: it
resolves paths safely, lists directories, parses ``.npy`` / ``.npz`` headers and raw layouts into
an ``ArrayLayout`` (dtype, shape, order, byte offset), and creates files for writing. The
executors fill device memory from the opened files (``ExecutorSession.fill_from_file``).

Path safety (each refusal is a ``DataError`` with a code the shim maps to a Python exception):

* absolute paths, ``..`` components and NUL bytes are refused outright (``BAD_PATH``);
* symbolic links are followed only while they stay inside the root: they are resolved here, one
  component at a time (``..`` inside a link target may not climb above the root), and then every
  component is opened with ``O_NOFOLLOW`` from the root's directory descriptor, so a link swapped
  in between resolving and opening is refused rather than followed (``OUTSIDE_ROOT``);
* only regular files are read or written; devices, FIFOs and sockets are refused before they are
  opened (``NOT_A_FILE``), so opening one can have no side effect.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import io
import math
import os
import secrets
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_agent.errors import AgentError

#: the protocol error kind of every refusal of this module
DATA_ERROR_KIND = "DataError"

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: a .npy header longer than this is refused (NumPy writes 128 bytes, or a little more)
MAX_NPY_HEADER_BYTES = 1 << 16
MAX_SYMLINK_HOPS = 40
MAX_LIST_ENTRIES = 10_000
MAX_DIMENSIONS = 32
#: prefix of the temporary file a save writes before renaming it into place (hidden from ls)
TEMP_PREFIX = ".harp-tmp-"
#: dtype kinds a GPUArray can hold: bool, signed, unsigned, float, complex
ARRAY_KINDS = "biufc"

_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


class DataError(AgentError):
    """A refused or failed data request; ``code`` says which (see the module docstring)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(DATA_ERROR_KIND, message, code)


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """Where an array's bytes are in a file and what they mean."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # byte offset of the first element in the file
    identity: str  # the file as described (device, inode, size, mtime): a read checks it
    format: str  # "npy", "npz" or "raw"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        strides: list[int] = []
        step = self.dtype.itemsize
        dims = self.shape if self.fortran_order else tuple(reversed(self.shape))
        for n in dims:
            strides.append(step)
            step *= max(n, 1)
        return tuple(strides) if self.fortran_order else tuple(reversed(strides))

    def to_wire(self) -> dict[str, Any]:
        return {"format": self.format, "dtype": self.dtype.str, "shape": list(self.shape),
                "strides": list(self.strides), "order": "F" if self.fortran_order else "C",
                "nbytes": self.nbytes, "offset": self.offset, "file": self.identity}


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """A regular file of the tree, opened for reading; ``fd`` is closed by ``open_file``."""

    fd: int
    path: str
    size: int
    identity: str

    def check_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise DataError("TRUNCATED", (
                f"{self.path}: bytes [{offset}, {offset + nbytes}) were asked for, but the file "
                f"has only {self.size} bytes (truncated while in use?)"))


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _os_error(path: str, error: OSError) -> DataError:
    if error.errno == errno.ENOENT:
        return DataError("NOT_FOUND", f"{path}: no such file or directory in the data root")
    if error.errno in (errno.EACCES, errno.EPERM):
        return DataError("PERMISSION", f"{path}: the agent's operating-system user may not "
                         f"access it ({error.strerror})")
    if error.errno == errno.ELOOP:
        return DataError("OUTSIDE_ROOT", f"{path}: a symbolic link appeared while it was being "
                         "opened; refused (links are followed only as resolved, inside the root)")
    if error.errno == errno.ENOTDIR:
        return DataError("NOT_A_DIRECTORY", f"{path}: a component of the path is not a "
                         "directory")
    if error.errno == errno.ENOSPC:
        return DataError("IO", f"{path}: no space left on the agent's disk")
    return DataError("IO", f"{path}: {error.strerror or error}")


def check_array_dtype(dtype: np.dtype, what: str) -> None:
    """Refuse dtypes a GPUArray cannot hold (objects, records, strings, datetimes)."""
    if dtype.hasobject:
        raise DataError("BAD_FORMAT", f"{what}: object arrays hold Python objects (pickles), "
                        "which the agent never loads")
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in ARRAY_KINDS:
        raise DataError("BAD_FORMAT", f"{what}: dtype {dtype} is not supported on the GPU "
                        "(bool, integer, float and complex arrays are)")


def _check_shape(shape: Any, what: str) -> tuple[int, ...]:
    if (not isinstance(shape, tuple | list) or len(shape) > MAX_DIMENSIONS
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise DataError("BAD_FORMAT", f"{what}: shape must be at most {MAX_DIMENSIONS} "
                        f"non-negative integers, not {shape!r}")
    if math.prod(shape) >= 1 << 62:
        # NumPy's int64 products would wrap round and pass the file-size check
        raise DataError("BAD_FORMAT", f"{what}: shape {tuple(shape)} has more elements than "
                        "any file or device could hold")
    return tuple(shape)


# {{{ .npy headers


def parse_npy_header(data: bytes, what: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, header length)`` of the ``.npy`` bytes that start
    ``data`` (the first ``MAX_NPY_HEADER_BYTES`` or more of the file suffice)."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise DataError("BAD_FORMAT", f"{what} is not a .npy file (no NumPy magic): use "
                        "remote.load_raw(path, dtype, shape) for raw binary")
    major = data[6]
    if major == 1:
        (length,), start = struct.unpack_from("<H", data, 8), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise DataError("TRUNCATED", f"{what}: the .npy header is cut short")
        (length,), start = struct.unpack_from("<I", data, 8), 12
    else:
        raise DataError("BAD_FORMAT", f"{what}: .npy format version {major}.{data[7]} is not "
                        "supported (1.0, 2.0 and 3.0 are)")
    if length > MAX_NPY_HEADER_BYTES:
        raise DataError("BAD_FORMAT", f"{what}: .npy header of {length} bytes is too long")
    if len(data) < start + length:
        raise DataError("TRUNCATED", f"{what}: the .npy header is cut short ({len(data)} bytes "
                        f"of a {start + length}-byte header)")
    text = data[start:start + length].decode("utf8" if major == 3 else "latin1")
    try:
        header = ast.literal_eval(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise DataError("BAD_FORMAT", f"{what}: the .npy header is not a Python literal: "
                        f"{text[:80]!r}") from None
    if (not isinstance(header, dict)
            or set(header) != {"descr", "fortran_order", "shape"}
            or not isinstance(header["fortran_order"], bool)):
        raise DataError("BAD_FORMAT", f"{what}: the .npy header must hold exactly descr, "
                        f"fortran_order (bool) and shape: {text[:80]!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError) as e:
        raise DataError("BAD_FORMAT", f"{what}: bad dtype {header['descr']!r}: {e}") from None
    check_array_dtype(dtype, what)
    shape = _check_shape(header["shape"], what)
    return dtype, shape, header["fortran_order"], start + length


def npy_header(dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> bytes:
    """The ``.npy`` header NumPy itself would write for such an array."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order,
              "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(out, header)
    except ValueError:  # a header past 64 KiB (a very long shape) needs version 2.0
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, header)
    return out.getvalue()


# }}}


class DataStore:
    """The served tree; see the module docstring. ``root=None``: this agent serves no data."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 writable: bool = False) -> None:
        self.writable = writable
        self.root: str | None = None
        self._root_fd: int | None = None
        if root is not None:
            real = os.path.realpath(root)
            if not os.path.isdir(real):
                raise ValueError(f"--data-root {os.fspath(root)!r} is not a directory")
            self.root = real
            self._root_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def info(self) -> dict[str, Any]:
        return {"root": self.root, "writable": bool(self.root and self.writable)}

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # {{{ paths

    def _root(self) -> int:
        if self._root_fd is None:
            raise DataError("NO_DATA_ROOT", "this agent serves no data: start it with "
                            "harp-agent --data-root DIR (and --data-writable to allow saving)")
        return self._root_fd

    @staticmethod
    def _components(path: str) -> list[str]:
        """The components of a path a notebook sent, or BAD_PATH."""
        if not isinstance(path, str):
            raise DataError("BAD_PATH", f"a data path must be a string, not {type(path).__name__}")
        if "\x00" in path:
            raise DataError("BAD_PATH", f"{path!r}: NUL bytes are not allowed in a data path")
        if path.startswith("/"):
            raise DataError("BAD_PATH", f"{path!r}: absolute paths are refused; name files "
                            "relative to the agent's data root (remote.ls() lists it)")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise DataError("BAD_PATH", f"{path!r}: '..' is refused; paths stay inside the "
                            "agent's data root")
        return parts

    def _open_dir(self, parts: list[str], shown: str) -> int:
        """A descriptor of ``root/parts`` (every component opened without following links)."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root())
        try:
            for part in parts:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as e:
            os.close(fd)
            raise _os_error(shown, e) from None
        return fd

    def _resolve(self, path: str) -> list[str]:
        """The real components, inside the root, of what ``path`` names (links resolved)."""
        pending = list(reversed(self._components(path)))
        resolved: list[str] = []
        hops = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":  # only from link targets: the user's own '..' were refused
                if not resolved:
                    raise DataError("OUTSIDE_ROOT", f"{path}: a symbolic link on the way leads "
                                    "outside the agent's data root; refused")
                resolved.pop()
                continue
            shown = "/".join([*resolved, name])
            dir_fd = self._open_dir(resolved, path)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
            except OSError as e:
                raise _os_error(path if not pending else shown, e) from None
            finally:
                os.close(dir_fd)
            if target is not None:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise DataError("BAD_PATH", f"{path}: too many levels of symbolic links")
                if target.startswith("/"):
                    resolved = self._inside_root(target, path)
                    target_parts = []
                else:
                    target_parts = target.split("/")
                pending.extend(reversed(target_parts))
                continue
            if pending and not stat.S_ISDIR(st.st_mode):
                raise DataError("NOT_A_DIRECTORY", f"{path}: {shown} is not a directory")
            resolved.append(name)
        return resolved

    def _inside_root(self, target: str, path: str) -> list[str]:
        """An absolute link target as components below the root, or OUTSIDE_ROOT."""
        assert self.root is not None
        root_parts = [p for p in self.root.split("/") if p]
        target_parts = [p for p in os.path.normpath(target).split("/") if p]
        if target_parts[:len(root_parts)] != root_parts:
            raise DataError("OUTSIDE_ROOT", f"{path}: a symbolic link on the way points to "
                            f"{target}, outside the agent's data root; refused")
        return target_parts[len(root_parts):]

    @contextlib.contextmanager
    def open_file(self, path: str) -> Iterator[OpenedFile]:
        """The regular file ``path`` names, opened for reading (closed after the block)."""
        parts = self._resolve(path)
        if not parts:
            raise DataError("NOT_A_FILE", f"{path!r} is the data root, a directory")
        dir_fd = self._open_dir(parts[:-1], path)
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            self._check_regular(st, path)
            # O_NONBLOCK: should a FIFO appear in the file's place now, open must not block
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as e:
            raise _os_error(path, e) from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            self._check_regular(st, path)
            yield OpenedFile(fd, path, st.st_size, _identity(st))
        finally:
            os.close(fd)

    @staticmethod
    def _check_regular(st: os.stat_result, path: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise DataError("NOT_A_FILE", f"{path}: is a directory (remote.ls({path!r}) lists "
                            "it)")
        if not stat.S_ISREG(st.st_mode):
            raise DataError("NOT_A_FILE", f"{path}: not a regular file (a device, FIFO or "
                            "socket); only regular files are served")

    # }}}

    # {{{ listing and describing

    def listing(self, path: str = "") -> list[dict[str, Any]]:
        """The entries of directory ``path`` (or the one entry of a file), sorted by name:
        ``{name, path, type: "dir"|"file", size?, format?, dtype?, shape?, order?, error?}``.
        Links that lead outside the root, broken links and special files are left out."""
        parts = self._resolve(path)
        prefix = "/".join(parts)
        if parts:
            parent = self._open_dir(parts[:-1], path)
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError as e:
                raise _os_error(path, e) from None
            finally:
                os.close(parent)
            if stat.S_ISREG(st.st_mode):
                return [self._entry(prefix, parts[-1], st)]
        dir_fd = self._open_dir(parts, path)
        try:
            names = sorted(os.listdir(dir_fd))
        finally:
            os.close(dir_fd)
        entries = []
        for name in names:
            if name.startswith(TEMP_PREFIX):
                continue
            shown = f"{prefix}/{name}" if prefix else name
            try:
                real = self._resolve(shown)
                parent = self._open_dir(real[:-1], shown)
                try:
                    st = os.stat(real[-1], dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(parent)
            except DataError:
                continue  # a link leading outside, or broken, or gone meanwhile: not served
            if stat.S_ISDIR(st.st_mode):
                entries.append({"name": name, "path": shown, "type": "dir"})
            elif stat.S_ISREG(st.st_mode):
                entries.append(self._entry(shown, name, st))
            if len(entries) >= MAX_LIST_ENTRIES:
                break
        return entries

    def _entry(self, shown: str, name: str, st: os.stat_result) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "path": shown, "type": "file",
                                 "size": st.st_size}
        if name.endswith(".npy"):
            try:
                layout = self.describe(shown, {})
                entry.update(format="npy", dtype=layout.dtype.str, shape=list(layout.shape),
                             order="F" if layout.fortran_order else "C")
            except DataError as e:
                entry["error"] = str(e)
        elif name.endswith(".npz"):
            entry["format"] = "npz"
        return entry

    def open_request(self, path: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``data_open``: the array's layout on the wire, or, for an .npz file
        named without a key, ``{format: "npz", members: [...]}``."""
        with self.open_file(path) as opened:
            if (spec.get("key") is None and spec.get("format", "auto") in ("auto", "npz")
                    and os.pread(opened.fd, 4, 0) == ZIP_MAGIC):
                with self._zip(opened) as archive:
                    names = archive.namelist()
                return {"format": "npz", "file": opened.identity,
                        "members": [n[:-4] if n.endswith(".npy") else n for n in names]}
            return self.describe_opened(opened, spec).to_wire()

    def describe(self, path: str, spec: dict[str, Any]) -> ArrayLayout:
        """The layout of the array ``path`` holds. ``spec``: ``format`` ("auto", "npy",
        "npz", "raw"), ``key`` (an .npz member), and for raw binary ``dtype``, ``shape``,
        ``offset`` (bytes) and ``order`` ("C" or "F")."""
        with self.open_file(path) as opened:
            return self.describe_opened(opened, spec)

    def describe_opened(self, opened: OpenedFile, spec: dict[str, Any]) -> ArrayLayout:
        fmt = spec.get("format", "auto")
        if fmt == "raw":
            return self._raw_layout(opened, spec)
        head = os.pread(opened.fd, 8, 0)
        if fmt == "auto":
            fmt = "npz" if head.startswith(ZIP_MAGIC) else "npy"
        if fmt == "npy":
            return self._npy_layout(opened, 0, opened.size, opened.path, "npy")
        if fmt == "npz":
            return self._npz_layout(opened, spec.get("key"))
        raise DataError("BAD_FORMAT", f"unknown format {fmt!r}: use npy, npz or raw")

    def _npy_layout(self, opened: OpenedFile, start: int, size: int, what: str,
                    fmt: str) -> ArrayLayout:
        head = os.pread(opened.fd, min(size, MAX_NPY_HEADER_BYTES + 12), start)
        dtype, shape, fortran_order, header_length = parse_npy_header(head, what)
        layout = ArrayLayout(dtype, shape, fortran_order, start + header_length,
                             opened.identity, fmt)
        if header_length + layout.nbytes > size:
            raise DataError("TRUNCATED", (
                f"{what} is truncated: its header promises {layout.nbytes} bytes of "
                f"{dtype} {shape} data, the file holds only {max(size - header_length, 0)}"))
        return layout

    @contextlib.contextmanager
    def _zip(self, opened: OpenedFile) -> Iterator[zipfile.ZipFile]:
        with os.fdopen(os.dup(opened.fd), "rb") as stream:
            try:
                archive = zipfile.ZipFile(stream)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise DataError("BAD_FORMAT", f"{opened.path} is not a valid .npz (zip) "
                                f"file: {e}") from None
            with archive:
                yield archive

    def _npz_layout(self, opened: OpenedFile, key: Any) -> ArrayLayout:
        with self._zip(opened) as archive:
            names = archive.namelist()
            if key is None:
                raise DataError("BAD_FORMAT", f"{opened.path} holds several arrays: name one "
                                "(remote.load(path, key=...))")
            if not isinstance(key, str):
                raise DataError("BAD_FORMAT", f"an .npz key must be a string, not {key!r}")
            member = key if key in names else f"{key}.npy"
            if member not in names:
                shown = ", ".join(n[:-4] if n.endswith(".npy") else n for n in names)
                raise DataError("NOT_FOUND", f"{opened.path} has no array {key!r} (it has: "
                                f"{shown or 'none'})")
            info = archive.getinfo(member)
        what = f"{opened.path}[{key!r}]"
        if info.flag_bits & 0x1:
            raise DataError("NOT_SUPPORTED", f"{what} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError("NOT_SUPPORTED", (
                f"{what} is compressed (np.savez_compressed): the agent reads stored members "
                "straight into device memory; save with np.savez, or as .npy"))
        local = os.pread(opened.fd, _ZIP_LOCAL_HEADER.size, info.header_offset)
        if len(local) < _ZIP_LOCAL_HEADER.size or not local.startswith(ZIP_MAGIC):
            raise DataError("BAD_FORMAT", f"{what}: bad zip local header")
        fields = _ZIP_LOCAL_HEADER.unpack(local)
        name_length, extra_length = fields[-2], fields[-1]
        start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > opened.size:
            raise DataError("TRUNCATED", f"{what}: the archive is truncated")
        return self._npy_layout(opened, start, info.file_size, what, "npz")

    @staticmethod
    def _raw_layout(opened: OpenedFile, spec: dict[str, Any]) -> ArrayLayout:
        what = opened.path
        if not isinstance(spec.get("dtype"), str):
            raise DataError("BAD_FORMAT", f"{what}: raw binary needs a dtype string")
        try:
            dtype = np.dtype(spec["dtype"])
        except (TypeError, ValueError) as e:
            raise DataError("BAD_FORMAT", f"{what}: bad dtype {spec['dtype']!r}: {e}") from None
        check_array_dtype(dtype, what)
        shape = _check_shape(spec.get("shape"), what)
        offset = spec.get("offset", 0)
        order = spec.get("order", "C")
        if type(offset) is not int or offset < 0:
            raise DataError("BAD_FORMAT", f"{what}: offset must be a non-negative int")
        if order not in ("C", "F"):
            raise DataError("BAD_FORMAT", f"{what}: order must be 'C' or 'F', not {order!r}")
        layout = ArrayLayout(dtype, shape, order == "F", offset, opened.identity, "raw")
        if offset + layout.nbytes > opened.size:
            raise DataError("TRUNCATED", (
                f"{what} is too short: {layout.nbytes} bytes of {dtype} {shape} from byte "
                f"{offset} need {offset + layout.nbytes}, the file has {opened.size}"))
        return layout

    @contextlib.contextmanager
    def open_for_read(self, path: str, identity: str) -> Iterator[OpenedFile]:
        """``path`` opened for reading, checked to be the file ``describe`` saw."""
        with self.open_file(path) as opened:
            if opened.identity != identity:
                raise DataError("CHANGED", f"{path} changed on the agent between describing "
                                "and reading it; load it again")
            yield opened

    # }}}

    # {{{ writing

    @contextlib.contextmanager
    def create(self, path: str, *, overwrite: bool = True) -> Iterator[int]:
        """A descriptor to write the new content of ``path`` to; the file replaces ``path``
        (atomically, by rename) only when the block ends without an error."""
        self._root()
        if not self.writable:
            raise DataError("READ_ONLY", "this agent serves its data root read-only (start it "
                            "with harp-agent --data-writable to allow remote.save)")
        parts = self._components(path)
        if not parts:
            raise DataError("BAD_PATH", f"{path!r} names the data root, not a file")
        parent_parts = self._resolve("/".join(parts[:-1])) if len(parts) > 1 else []
        name = parts[-1]
        dir_fd = self._open_dir(parent_parts, path)
        temp = (TEMP_PREFIX + secrets.token_hex(4) + "-" + name)[:255]
        try:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not overwrite:
                    raise DataError("EXISTS", f"{path} exists (save with overwrite=True to "
                                    "replace it)")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise DataError("NOT_A_FILE", f"{path} exists and is not a regular file")
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            except OSError as e:
                raise _os_error(path, e) from None
            try:
                yield fd
                os.close(fd)
                fd = -1
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
        except OSError as e:
            raise _os_error(path, e) from None
        finally:
            os.close(dir_fd)

    # }}}


def data_error_from_os(path: str, error: OSError) -> DataError:
    """The DataError for an OSError met while reading or writing ``path``."""
    return _os_error(path, error)


def read_exactly(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fill ``buffer`` (bytes) from ``fd`` at ``offset``; TRUNCATED if the file ends first."""
    done, total = 0, buffer.nbytes
    while done < total:
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise DataError("TRUNCATED", f"{path} ended at byte {offset + done} while "
                            f"{total - done} more bytes were to be read (truncated while in use?)")
        done += count


def write_all(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Write all of ``buffer`` to ``fd`` at ``offset``."""
    done, total = 0, buffer.nbytes
    while done < total:
        done += os.pwritev(fd, [buffer[done:]], offset + done)
