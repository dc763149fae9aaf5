"""splice.utils.atomic: whole-or-nothing files and directories under concurrent writers and crashes."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from splice.utils import atomic
from splice.utils.atomic import atomic_directory, atomic_path, write_atomic

SIZE = 1 << 20  # large enough that a non-atomic write is seen half done


def _payload(i: int) -> bytes:
    return bytes([i]) * SIZE


def _check_whole(data: bytes, writers: range) -> None:
    assert len(data) == SIZE and data == _payload(data[0]) and data[0] in writers, \
        f"partial or mixed file: {len(data)} bytes, first {data[:1]!r}, last {data[-1:]!r}"


def test_write_replaces_and_leaves_only_the_target(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    assert write_atomic(dest, b"new") == dest and dest.read_bytes() == b"new"
    write_atomic(dest, "é")
    assert dest.read_text(encoding="utf-8") == "é"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_written_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_write_refuses_other_types_before_touching_the_file(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    with pytest.raises(TypeError, match="bytes or str"):
        write_atomic(dest, {"a": 1})
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_error_inside_the_write_keeps_the_old_file(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_writer_that_creates_nothing_is_an_error(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="did not create"):
        with atomic_path(dest):
            pass
    assert dest.read_bytes() == b"old"


def test_concurrent_threads_never_expose_a_partial_file(tmp_path):
    dest = tmp_path / "f.bin"
    write_atomic(dest, _payload(0))
    writers, errors, done = range(1, 5), [], threading.Event()

    def write(i):
        try:
            for _ in range(6):
                write_atomic(dest, _payload(i))
        except BaseException as exc:  # reported below: a writer must never fail
            errors.append(exc)

    def read():
        while not done.is_set():
            _check_whole(dest.read_bytes(), range(0, 5))

    threads = [threading.Thread(target=write, args=(i,)) for i in writers]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert errors == []
    _check_whole(dest.read_bytes(), writers)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# Children load the module from its file: importing the splice package would import torch (slow).
_LOAD = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("atomic", {atomic.__file__!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
"""
_CHILD = _LOAD + """
import sys
path, i = sys.argv[1], int(sys.argv[2])
for _ in range(8):
    atomic.write_atomic(path, bytes([i]) * SIZE)
"""


def test_concurrent_processes_never_expose_a_partial_file(tmp_path):
    dest = tmp_path / "f.bin"
    write_atomic(dest, _payload(0))
    children = [subprocess.Popen([sys.executable, "-c", f"SIZE = {SIZE}" + _CHILD, str(dest), str(i)])
                for i in range(1, 5)]
    while any(c.poll() is None for c in children):
        _check_whole(dest.read_bytes(), range(0, 5))
    assert [c.returncode for c in children] == [0] * 4
    _check_whole(dest.read_bytes(), range(1, 5))
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


_KILLED = _LOAD + """
import os, signal, sys
with atomic.atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half of the new")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_killed_mid_write_keeps_the_old_file(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    child = subprocess.run([sys.executable, "-c", _KILLED, str(dest)])
    assert child.returncode == -signal.SIGKILL
    assert dest.read_bytes() == b"old"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != dest)
    assert len(leftovers) == 1 and leftovers[0].startswith(".f.") and leftovers[0].endswith(".tmp")


# --- directories ---------------------------------------------------------------------------

def _build(directory: Path, tag: str, files: int = 8) -> None:
    for k in range(files):
        (directory / f"part{k}").write_text(tag * 1000)


def _tags(directory: Path) -> set[str]:
    return {p.read_text()[:1] for p in directory.iterdir()}


def test_directory_is_installed_whole(tmp_path):
    target = tmp_path / "out" / "ckpt"
    with atomic_directory(target) as tmp:
        assert not target.exists() and tmp.parent == target.parent
        _build(tmp, "a")
    assert _tags(target) == {"a"} and len(list(target.iterdir())) == 8
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]


def test_existing_directory_is_refused_before_the_build(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    ran = []
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(target):
            ran.append(1)
    assert ran == [] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        _build(tmp, "a", files=3)
        (tmp / "only-in-a").write_text("a")
    with atomic_directory(target, overwrite=True) as tmp:
        _build(tmp, "b", files=3)
    assert sorted(p.name for p in target.iterdir()) == ["part0", "part1", "part2"] and _tags(target) == {"b"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_build_leaves_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        _build(tmp, "a")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            _build(tmp, "b", files=2)
            raise KeyboardInterrupt
    assert _tags(target) == {"a"} and len(list(target.iterdir())) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_directory_builders(tmp_path, overwrite):
    """Without overwrite exactly one build is installed and the others are told; with it, the last
    one wins. Either way the target is one whole build and nothing else is left beside it."""
    target = tmp_path / "ckpt"
    barrier, outcomes = threading.Barrier(4), {}

    def builder(tag):
        try:
            with atomic_directory(target, overwrite=overwrite) as tmp:
                _build(tmp, tag)
                barrier.wait()  # every build is complete before any is installed
            outcomes[tag] = "installed"
        except FileExistsError:
            outcomes[tag] = "refused"

    threads = [threading.Thread(target=builder, args=(tag,)) for tag in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    installed = sorted(tag for tag, o in outcomes.items() if o == "installed")
    assert len(outcomes) == 4 and len(installed) == (4 if overwrite else 1)
    assert len(list(target.iterdir())) == 8 and len(_tags(target)) == 1 and _tags(target) <= set(installed)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
