"""Bytes in, a content-addressed path out (store/ab/abcdef...ext): the same bytes are never written twice.

Also the append-only parquet tables stages keep beside the catalog (sightings, caches)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import polars as pl


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: after a rename, a power cut must not bring the old name back."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        """Store bytes; returns (image_id, path). A second put of the same bytes writes nothing."""
        image_id = sha256_bytes(data)
        path = self.path(image_id, ext)
        if not path.exists():
            atomic_write_bytes(path, data)
        return image_id, path


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
