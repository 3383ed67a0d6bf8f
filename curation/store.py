"""Bytes in, a content-addressed path out (store/ab/abcdef...ext): the same bytes are never written twice.

Also the append-only parquet tables stages keep beside the catalog (sightings, caches)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    import polars as pl


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write via a temp file in the same directory and rename: readers never see a torn file.

    ``fsync=False``: the caller makes the file durable later (`sync_files`), before anything
    durable refers to it; until then a power cut may lose it or leave it empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: after a rename, a power cut must not bring the old name back."""
    _fsync_path(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def fsync_file(path: Path) -> None:
    """Flush a file written earlier (by this process or another) to disk."""
    _fsync_path(path, os.O_RDONLY)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc_syncfs = None


def _syncfs(fd: int) -> bool:
    """syncfs(2) (Linux): flush every dirty file and directory of the filesystem holding ``fd``, in
    one call. False where it is unavailable or fails."""
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            import ctypes

            _libc_syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _libc_syncfs = False
    return bool(_libc_syncfs) and _libc_syncfs(fd) == 0


def sync_files(root: Path, paths: Iterable[Path]) -> None:
    """Make ``paths`` (files under ``root``, written with ``fsync=False``) and their directory
    entries durable: one syncfs of root's filesystem where the OS has it (far cheaper than a fsync
    per file), else a fsync of each file, then of each directory holding them, then of ``root``."""
    root = Path(root)
    paths = list(paths)
    if not paths or not root.exists():
        return
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    dirs = set()
    for p in paths:
        try:
            fsync_file(p)
        except FileNotFoundError:
            continue  # removed meanwhile: nothing left to make durable
        dirs.add(p.parent)
    for d in sorted(dirs):
        fsync_dir(d)
    fsync_dir(root)


_deferred = threading.local()


@contextmanager
def deferred_sync() -> Iterator[None]:
    """In this thread, `ImageStore.put` writes without fsync: a caller that stores many files and
    calls `sync_files` once before committing any reference to them (a scrape's committer)."""
    prev = getattr(_deferred, "on", False)
    _deferred.on = True
    try:
        yield
    finally:
        _deferred.on = prev


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class ImageStore:
    """A directory of images named by the sha256 of their bytes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def relpath(self, image_id: str, ext: str) -> str:
        return f"{image_id[:2]}/{image_id}.{ext}"

    def path(self, image_id: str, ext: str) -> Path:
        return self.root / self.relpath(image_id, ext)

    def put(self, data: bytes, ext: str) -> tuple[str, Path]:
        """Store bytes; returns (image_id, path). A second put of the same bytes writes nothing.

        Durable on return (fsync), except inside `deferred_sync`: then the caller syncs."""
        image_id = sha256_bytes(data)
        path = self.path(image_id, ext)
        try:
            # A wrong size is an unsynced write a power cut left empty: written again.
            intact = path.stat().st_size == len(data)
        except FileNotFoundError:
            intact = False
        if not intact:
            atomic_write_bytes(path, data, fsync=not getattr(_deferred, "on", False))
        return image_id, path

    def sync(self, paths: Iterable[Path]) -> None:
        """Make files written under `deferred_sync` durable; see `sync_files`."""
        sync_files(self.root, paths)

    def intact(self, image_id: str, path: Path) -> bool:
        """Whether ``path`` holds the bytes ``image_id`` names (a power cut can lose an unsynced file)."""
        try:
            return sha256_bytes(path.read_bytes()) == image_id
        except OSError:
            return False


class PartsTable:
    """An append-only table kept as parquet part files in one directory.

    Appending writes a new part (temp file + rename), so concurrent writers never collide and a
    crash never leaves a torn file; readers concatenate the parts. ``compact`` merges them into
    one, writing the merged part before removing any old one.

    One lock file per table (flock, across processes): appends and reads hold it shared,
    ``compact`` exclusive, so a compaction never deletes a part another process is writing or
    reading, and never runs while an append is half done.
    """

    LOCK_NAME = "parts.lock"

    def __init__(self, root: str | Path, schema: dict):
        self.root = Path(root)
        self.schema = schema

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.exists() else []

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """The table's lock: shared for appends and reads, exclusive for compaction."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / self.LOCK_NAME, "a+")
        except OSError:
            if exclusive:
                raise
            yield  # a read-only copy of a workspace: nobody can be compacting it
            return
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_part(self, frame: "pl.DataFrame") -> Path:
        # Time-ordered names: later parts win when a reader keeps the last of duplicate keys.
        path = self.root / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{path.name}.tmp"
        try:
            frame.write_parquet(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def append(self, frame: "pl.DataFrame") -> Path | None:
        if frame.is_empty():
            return None
        with self.locked(exclusive=False):
            return self._write_part(frame)

    def _read(self, parts: list[Path]) -> "pl.DataFrame":
        import polars as pl

        if not parts:
            return pl.DataFrame(schema=self.schema)
        return pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed")

    def read(self) -> "pl.DataFrame":
        if not self.parts():
            return self._read([])
        with self.locked(exclusive=False):
            return self._read(self.parts())

    def compact(self, frame: "pl.DataFrame | None" = None, *, key: str = "image_id") -> None:
        """Replace every part by one holding ``frame`` (default: everything read).

        ``frame`` replaces the rows of the ``key`` values it holds; rows of other keys still in the
        parts are kept: they were appended after the caller read ``frame`` (outside this lock), and
        dropping them would lose a concurrent writer's work.
        """
        import polars as pl

        if not self.root.exists():
            return
        with self.locked(exclusive=True):
            old = self.parts()
            if len(old) <= 1 and frame is None:
                return
            current = self._read(old)
            if frame is None:
                merged = current
            else:
                late = current.filter(~pl.col(key).is_in(frame[key].implode())) if key in current.columns else current.clear()
                merged = pl.concat([frame, late], how="vertical_relaxed") if late.height else frame
            self._write_part(merged)
            for p in old:
                p.unlink(missing_ok=True)
