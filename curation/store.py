"""Bytes in, a content-addressed path out (store/ab/abcdef...ext): the same bytes are never written twice.

Also the append-only parquet tables stages keep beside the catalog (sightings, caches)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

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
    """

    def __init__(self, root: str | Path, schema: dict):
        self.root = Path(root)
        self.schema = schema

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.exists() else []

    def append(self, frame: "pl.DataFrame") -> Path | None:
        if frame.is_empty():
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        # Time-ordered names: later parts win when a reader keeps the last of duplicate keys.
        path = self.root / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{path.name}.tmp"
        try:
            frame.write_parquet(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def read(self) -> "pl.DataFrame":
        import polars as pl

        parts = self.parts()
        if not parts:
            return pl.DataFrame(schema=self.schema)
        return pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed")

    def compact(self, frame: "pl.DataFrame | None" = None) -> None:
        """Replace every part by one holding ``frame`` (default: everything read)."""
        old = self.parts()
        if len(old) <= 1 and frame is None:
            return
        self.append(self.read() if frame is None else frame)
        for p in old:
            p.unlink(missing_ok=True)
