"""A content-addressed file store for large blobs (uploads, exported artifacts).

A blob lives at ``<root>/<sha[:2]>/<sha>``; the database only keeps the checksum. Writing is
atomic (a temporary file in ``<root>/tmp`` renamed into place), and storing the same content twice
keeps one copy. Directories the store creates (and the data directory above it, when missing) are
readable by their owner only (:func:`make_private_dir`, 0700); blobs are 0640.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


def make_private_dir(path: Path) -> None:
    """Create ``path`` and each of its missing parents with mode 0700 (existing ones are left as
    they are)."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)


def unpack_dir(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a directory stored by :meth:`BlobStore.put_dir` into ``dest`` (created if needed): its
    regular files and folders only, never outside ``dest``. Returns ``dest``."""
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        tar.extractall(out, members=members, filter="data")
    return out


class BlobStore:
    """Files stored by SHA-256 under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def tmp_dir(self) -> Path:
        d = self.root / "tmp"
        if not d.is_dir():
            make_private_dir(d)
        return d

    def path(self, sha256: str) -> Path:
        """Where the blob with this checksum lives (it may not exist)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextmanager
    def temp_file(self) -> Iterator[tuple[Path, BinaryIO]]:
        """A temporary file inside the store (same file system, so it can be renamed into place)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="up-")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield path, fh
        finally:
            path.unlink(missing_ok=True)

    def adopt(self, tmp_path: Path, sha256: str) -> Path:
        """Move a finished temporary file into place under its checksum; returns the blob path."""
        dest = self.path(sha256)
        if not dest.parent.is_dir():
            make_private_dir(dest.parent)
        if dest.exists():
            tmp_path.unlink(missing_ok=True)
        else:
            os.replace(tmp_path, dest)
            os.chmod(dest, 0o640)
        return dest

    def put_stream(self, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[str, int]:
        """Store everything read from ``stream``; returns ``(sha256, size)``.

        Raises ``OverflowError`` when more than ``max_bytes`` arrive (nothing is kept).
        """
        digest = hashlib.sha256()
        size = 0
        with self.temp_file() as (tmp, fh):
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise OverflowError(size)
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            sha = digest.hexdigest()
            self.adopt(tmp, sha)
        return sha, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_stream(io.BytesIO(data))

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        with open(path, "rb") as fh:
            return self.put_stream(fh)

    def put_dir(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        """Store a directory as a gzip-compressed tar of its regular files (no links, sorted names)."""
        root = Path(path)
        with self.temp_file() as (tmp, fh):
            # gzip's header carries a time stamp: fix it so equal directories give equal blobs.
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
                    info = tar.gettarinfo(str(file), arcname=str(file.relative_to(root)))
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    with open(file, "rb") as src:
                        tar.addfile(info, src)
            fh.close()
            return self.put_file(tmp)
