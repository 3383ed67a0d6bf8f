"""Bytes in, a content-addressed path out (store/ab/abcdef...ext): the same bytes are never written twice."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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
