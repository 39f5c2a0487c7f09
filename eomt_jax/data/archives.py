"""Lazy, picklable readers for zip files and folders, with errors that name the file and member.

A data source is pickled into every Grain worker process, so an open `zipfile.ZipFile` must never travel with
it: each reader remembers only paths and reopens its handle the first time it is used in a process.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from typing import Protocol

import numpy as np
from PIL import Image


class DataError(ValueError):
    """A dataset file is missing, unreadable, or does not hold what the reader expected."""


class Reader(Protocol):
    """What sources need from a zip or folder: member names and bytes."""

    where: str

    def names(self) -> list[str]: ...

    def read(self, member: str) -> bytes: ...


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a file on disk.

    Lets `zipfile` open a zip stored uncompressed inside another zip without reading it into memory.
    """

    def __init__(self, path: str, start: int, size: int):
        self._f = open(path, "rb")  # noqa: SIM115 - closed with the view
        self._start, self._size, self._pos = start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self):
        self._f.close()
        super().close()


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the official zip here; see the README's download steps)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip file ({e}); the download is probably truncated or corrupt") from e


class ZipReader:
    """Members of one zip file, or of a zip nested inside another zip (`nested` = the inner zip's member name).

    A nested zip is read in place when it is stored uncompressed; a compressed one is loaded into memory once
    per process (as the original implementation does).
    """

    def __init__(self, path: str | os.PathLike, nested: str | None = None):
        self.path = os.fspath(path)
        self.nested = nested
        self.where = self.path if nested is None else f"{self.path} -> {nested}"
        self._zip, self._pid, self._lock = None, None, threading.Lock()
        self._names = [info.filename for info in self._handle().infolist() if not info.is_dir()]
        self._name_set = set(self._names)
        if nested is not None:
            # A compressed nested zip sits in memory; the process that builds the index may never read a
            # member (Grain workers do), so let it go until then.
            self._zip.close()
            self._zip = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = state["_pid"] = state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            with self._lock:
                if self._zip is None or self._pid != os.getpid():
                    self._zip, self._pid = self._open(), os.getpid()
        return self._zip

    def _open(self) -> zipfile.ZipFile:
        outer = _open_zip(self.path)
        if self.nested is None:
            return outer
        try:
            info = outer.getinfo(self.nested)
        except KeyError:
            raise DataError(f"{self.path}: member {self.nested!r} not found (expected the nested zip)") from None
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                # Data follow the 30-byte local header, the file name and the local extra field.
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                inner = _FileWindow(self.path, start, info.compress_size)
            else:
                inner = io.BytesIO(outer.read(self.nested))
            return zipfile.ZipFile(inner)
        except (zipfile.BadZipFile, zlib.error, OSError, struct.error) as e:
            raise DataError(f"{self.where}: nested zip is unreadable ({e}); the download is probably corrupt") from e

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, member: str) -> bool:
        return member in self._name_set

    def read(self, member: str) -> bytes:
        if member not in self._name_set:
            raise DataError(f"{self.where}: member {member!r} not found")
        try:
            return self._handle().read(member)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise DataError(f"{self.where}: member {member!r} is corrupt ({e})") from e


class FolderReader:
    """Files under a folder, named by their path relative to it (with '/' separators), like zip members."""

    def __init__(self, path: str | os.PathLike):
        self.path = self.where = os.fspath(path)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: folder not found")
        self._names = sorted(
            os.path.relpath(os.path.join(d, f), self.path).replace(os.sep, "/")
            for d, _, files in os.walk(self.path)
            for f in files
        )
        self._name_set = set(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, member: str) -> bool:
        return member in self._name_set

    def read(self, member: str) -> bytes:
        try:
            with open(os.path.join(self.path, member), "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{self.where}: cannot read {member!r} ({e})") from e


class FileReader:
    """One file as a reader whose only member is its name; `where` is its folder (errors read "folder: member")."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        self.where, self._name = os.path.split(os.path.abspath(path))

    def names(self) -> list[str]:
        return [self._name]

    def __contains__(self, member: str) -> bool:
        return member == self._name

    def read(self, member: str) -> bytes:
        try:
            with open(os.path.join(self.where, member), "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{self.where}: cannot read {member!r} ({e})") from e


def decode_image(reader: Reader, member: str) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3)."""
    try:
        with Image.open(io.BytesIO(reader.read(member))) as img:
            return np.asarray(img.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(f"{reader.where}: member {member!r} is not a readable image ({e})") from e


def decode_png(reader: Reader, member: str) -> np.ndarray:
    """A target PNG as stored: (H, W) for grey/palette (palette indices, not colours), (H, W, 3) for RGB."""
    try:
        with Image.open(io.BytesIO(reader.read(member))) as img:
            if img.mode == "RGBA":
                img = img.convert("RGB")
            return np.asarray(img)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{reader.where}: member {member!r} is not a readable PNG ({e})") from e
