"""All-or-nothing outputs: a directory or file appears at its final path only once it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`dst` as an absolute path, if a directory may be written there: raise FileExistsError when it is a file, or
    an existing directory and not `overwrite`."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; the output is a directory: name a new path")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; it replaces `dst` on success and is removed on any error."""
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a hidden temporary sibling, then rename it to `path`: readers see the old file or the
    complete new one, never a part. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
