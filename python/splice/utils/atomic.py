"""Atomic writing of files and directories, safe under concurrent writers and crashes.

Every writer builds its result under a uniquely named temporary beside the target (same
filesystem: ``.<name>.<random>.tmp``), makes it durable (fsync), renames it into place and fsyncs
the parent directory. A reader of the target sees the old content or the new one, never a partial
or mixed one. On an exception the temporary is removed and the target is left as it was. A process
killed mid-write leaves the target as it was and may leave its temporary behind (it cannot be told
apart from another process's write in progress, so nothing deletes it later).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def _temp_beside(path: Path, suffix: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for the caller to create as a file; when the block
    ends without error, fsync it and move it over ``path`` (last writer wins)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {path} did not create its temporary file {tmp}")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically; the file gets the umask's permissions."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic writes bytes or str, not {type(data).__name__}")
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; when the block ends without error, fsync
    its contents and rename it to ``target``.

    Without ``overwrite``: FileExistsError before the block if ``target`` exists, and after it if
    another writer installed ``target`` meanwhile (this build is then discarded). With
    ``overwrite``: an existing ``target`` is replaced whole, and among concurrent writers the last
    to install wins; while one replaces it, ``target`` is briefly absent, never partial.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))
        _install(tmp, target, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(target.parent)


def _install(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; with ``overwrite``, move whatever is in the way aside first."""
    replaced = []
    try:
        while True:
            try:
                os.rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not overwrite:
                    raise FileExistsError(f"{target} was created by another writer meanwhile; "
                                          "pass overwrite=True to replace it") from exc
            old = _temp_beside(target, "old")
            with suppress(FileNotFoundError):  # another writer moved it aside first
                os.rename(target, old)
                replaced.append(old)
    finally:
        for old in replaced:
            shutil.rmtree(old, ignore_errors=True)
