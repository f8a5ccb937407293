"""Uploads are untrusted: checks for model archives and data files, and a safe extractor.

Model archives (``.zip``, ``.tar``, ``.tar.gz``) may hold only weights in safetensors and plain
text / JSON files (config, tokenizer); never pickles (``.bin``, ``.pt``, ``.pkl``...), code
(``.py``), links, devices, absolute paths or paths that leave the extraction directory; and at
most ``max_files`` files and ``max_unpacked_bytes`` bytes once unpacked. :func:`check_model_archive`
runs at upload time (nothing is kept when it fails) and :func:`extract_model_archive` checks
everything again while extracting, writing each file itself (never ``extractall``) and counting
the bytes it really writes, so an archive that lies about its sizes is stopped too.

Server-side paths given in a job (``model.path``, ``data.path``) must resolve, links followed,
inside the configured roots: :func:`resolve_under`.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bitscout.errors import InvalidRequest, PayloadTooLarge
from bitscout.latency import LatencyTableError, parse_latency_table

#: File name endings a model archive may contain.
MODEL_FILE_SUFFIXES: tuple[str, ...] = (
    ".safetensors",
    ".json",
    ".txt",
    ".model",
    ".md",
    ".tiktoken",
    ".jinja",
    ".spm",
)
#: Endings that are refused by name with a specific message (pickles, code).
FORBIDDEN_SUFFIXES: tuple[str, ...] = (
    ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".h5", ".msgpack",
    ".py", ".pyc", ".so", ".joblib", ".onnx", ".gguf",
)  # fmt: skip
DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ArchiveMember:
    name: str
    size: int
    is_dir: bool


def infer_kind(filename: str) -> str | None:
    """``model`` for archive names, ``data`` for data file names, None otherwise."""
    low = filename.lower()
    if low.endswith(ARCHIVE_SUFFIXES):
        return "model"
    if low.endswith(DATA_SUFFIXES):
        return "data"
    return None


def _safe_name(name: str) -> str:
    """The member's normalised relative path, or InvalidRequest when it could leave the directory."""
    if "\x00" in name or "\\" in name:
        raise InvalidRequest(f"archive member {name!r} has a forbidden character", field="file")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidRequest(f"archive member {name!r} has an absolute path", field="file")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise InvalidRequest(f"archive member {name!r} leaves the extraction directory", field="file")
    return "" if norm == "." else norm


def _check_member_name(name: str) -> None:
    low = name.lower()
    base = posixpath.basename(low)
    if low.endswith(FORBIDDEN_SUFFIXES):
        raise InvalidRequest(
            f"archive member {name!r} is not allowed: only safetensors weights and text/JSON files "
            "(no pickles, no code)",
            field="file",
        )
    if not low.endswith(MODEL_FILE_SUFFIXES) and base not in ("license", "notice", ".gitattributes"):
        raise InvalidRequest(
            f"archive member {name!r} has a type that is not allowed (allowed: {', '.join(MODEL_FILE_SUFFIXES)})",
            field="file",
        )


def _members(path: Path) -> Iterator[tuple[ArchiveMember, object]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0xFFFF
                if mode and stat.S_ISLNK(mode):
                    raise InvalidRequest(f"archive member {info.filename!r} is a symbolic link", field="file")
                if info.flag_bits & 0x1:
                    raise InvalidRequest("encrypted archives are not supported", field="file")
                yield ArchiveMember(info.filename, int(info.file_size), info.is_dir()), info
        return
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidRequest(
            "a model upload must be a .zip, .tar or .tar.gz archive of safetensors weights and config files",
            field="file",
        ) from exc
    with tf:
        try:
            for ti in tf:
                if ti.issym() or ti.islnk():
                    raise InvalidRequest(f"archive member {ti.name!r} is a link", field="file")
                if not (ti.isfile() or ti.isdir()):
                    raise InvalidRequest(f"archive member {ti.name!r} is not a regular file", field="file")
                yield ArchiveMember(ti.name, int(ti.size), ti.isdir()), ti
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
            raise InvalidRequest(f"the archive is corrupt: {exc}", field="file") from exc


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def check_model_archive(
    path: str | os.PathLike[str], *, max_files: int, max_unpacked_bytes: int
) -> dict[str, object]:
    """Check an uploaded model archive without extracting it; returns facts about it.

    Raises ``InvalidRequest`` (field ``file``) for anything not allowed, ``PayloadTooLarge`` when it
    unpacks to too many files or bytes.
    """
    p = Path(path)
    files: list[str] = []
    total = 0
    try:
        for member, _ in _members(p):
            name = _safe_name(member.name)
            if member.is_dir or not name:
                continue
            _check_member_name(name)
            files.append(name)
            total += member.size
            if len(files) > max_files:
                raise PayloadTooLarge(f"the archive holds more than {max_files} files", field="file")
            if total > max_unpacked_bytes:
                raise PayloadTooLarge(
                    f"the archive unpacks to more than {max_unpacked_bytes / 1e6:.0f} MB", field="file"
                )
    except (zipfile.BadZipFile, zlib_error(), EOFError) as exc:
        raise InvalidRequest(f"the archive is corrupt: {exc}", field="file") from exc
    if not any(f.endswith(".safetensors") for f in files):
        raise InvalidRequest("the archive holds no .safetensors weights", field="file")
    if not any(posixpath.basename(f) == "config.json" for f in files):
        raise InvalidRequest("the archive holds no config.json", field="file")
    return {"files": len(files), "unpacked_bytes": total}


def _copy_limited(src: BinaryIO, dst: BinaryIO, remaining: int, name: str) -> int:
    written = 0
    while True:
        chunk = src.read(1024 * 1024)
        if not chunk:
            return written
        written += len(chunk)
        if written > remaining:
            raise PayloadTooLarge(
                f"archive member {name!r} unpacks to more than the limit allows", field="file"
            )
        dst.write(chunk)


def _check_safetensors(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise InvalidRequest(f"{path.name} is not a safetensors file", field="file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > MAX_SAFETENSORS_HEADER or n > path.stat().st_size - 8:
            raise InvalidRequest(f"{path.name} is not a safetensors file (bad header length)", field="file")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"{path.name} is not a safetensors file (bad header)", field="file") from exc
        if not isinstance(header, dict):
            raise InvalidRequest(f"{path.name} is not a safetensors file (bad header)", field="file")


def extract_model_archive(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_files: int, max_unpacked_bytes: int
) -> Path:
    """Safely extract a model archive into the empty (or new) directory ``dest``; returns the
    directory holding ``config.json`` (the archive's single top folder if it has one).

    Applies every check of :func:`check_model_archive` again, counts the bytes really written,
    never follows or creates links, and checks that each ``.safetensors`` file has a valid header.
    """
    src = Path(archive)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    check_model_archive(src, max_files=max_files, max_unpacked_bytes=max_unpacked_bytes)
    remaining = max_unpacked_bytes
    count = 0
    is_zip = zipfile.is_zipfile(src)
    zf = zipfile.ZipFile(src) if is_zip else None
    tf = None if is_zip else tarfile.open(src, "r:*")
    try:
        for member, handle in _members(src):
            name = _safe_name(member.name)
            if not name:
                continue
            target = (root / name).resolve()
            if root != target and root not in target.parents:
                raise InvalidRequest(
                    f"archive member {member.name!r} leaves the extraction directory", field="file"
                )
            if member.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            _check_member_name(name)
            count += 1
            if count > max_files:
                raise PayloadTooLarge(f"the archive holds more than {max_files} files", field="file")
            target.parent.mkdir(parents=True, exist_ok=True)
            if zf is not None:
                reader: BinaryIO = zf.open(handle)  # type: ignore[arg-type,assignment]
            else:
                assert tf is not None  # noqa: S101
                got = tf.extractfile(handle)  # type: ignore[arg-type]
                if got is None:
                    raise InvalidRequest(f"archive member {member.name!r} cannot be read", field="file")
                reader = got  # type: ignore[assignment]
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o640)
            with reader, os.fdopen(fd, "wb") as fh:
                remaining -= _copy_limited(reader, fh, remaining, member.name)
            if name.endswith(".safetensors"):
                _check_safetensors(target)
    finally:
        if zf is not None:
            zf.close()
        if tf is not None:
            tf.close()
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    return configs[0].parent if configs else root


#: the largest latency table accepted (bytes)
MAX_LATENCY_TABLE_BYTES = 16 * 1024 * 1024


def check_latency_table_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """Check an uploaded latency table (the JSON of :mod:`bitscout.latency`, as ``bitscout profile``
    writes it): every entry is checked, and a bad one is named (field ``file.entries.3.ms``)."""
    p = Path(path)
    if p.stat().st_size > MAX_LATENCY_TABLE_BYTES:
        raise InvalidRequest(f"a latency table is at most {MAX_LATENCY_TABLE_BYTES} bytes", field="file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the latency table is not UTF-8 JSON: {exc}", field="file") from None
    try:
        table = parse_latency_table(data)
    except LatencyTableError as exc:
        raise InvalidRequest(f"latency table: {exc}", field=f"file.{exc.field}" if exc.field else "file") from None
    return {"device": table["device"], "entries": len(table["entries"])}


def check_data_file(path: str | os.PathLike[str], filename: str) -> dict[str, object]:
    """Check an uploaded data file: a known extension, UTF-8 text, not empty, the first record
    readable. Raises ``InvalidRequest`` (field ``file``)."""
    low = filename.lower()
    if not low.endswith(DATA_SUFFIXES):
        raise InvalidRequest(
            f"a data upload must be one of {', '.join(DATA_SUFFIXES)} (got {filename!r})", field="file"
        )
    with open(path, "rb") as fh:
        head = fh.read(256 * 1024)
    if not head.strip():
        raise InvalidRequest("the data file is empty", field="file")
    if b"\x00" in head:
        raise InvalidRequest("the data file is not text (it contains NUL bytes)", field="file")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character may be cut at the end of the sample.
        if exc.start < len(head) - 4:
            raise InvalidRequest("the data file is not UTF-8 text", field="file") from exc
        text = head[: exc.start].decode("utf-8")
    text = text.lstrip("\ufeff")
    if low.endswith(".jsonl"):
        first = next((ln for ln in io.StringIO(text) if ln.strip()), "")
        complete = "\n" in text or len(head) < 256 * 1024
        if complete:
            try:
                obj = json.loads(first)
            except ValueError as exc:
                raise InvalidRequest("the first line of the JSONL file is not JSON", field="file") from exc
            if not isinstance(obj, dict):
                raise InvalidRequest("each JSONL line must be an object", field="file")
    elif low.endswith(".json"):
        if text.lstrip()[:1] not in ("[", "{"):
            raise InvalidRequest("a JSON data file must hold a list of objects", field="file")
    return {"format": low.rsplit(".", 1)[-1]}


def resolve_under(root: Path | None, value: str, *, what: str, field: str) -> Path:
    """Resolve a client-given server path inside ``root`` (links followed); raise ``InvalidRequest``
    when no root is configured, the path leaves it, or nothing is there."""
    if root is None:
        raise InvalidRequest(
            f"this server accepts no server-side {what} paths (no {what} root is set)", field=field
        )
    try:
        base = root.expanduser().resolve()
        candidate = Path(value)
        full = (candidate if candidate.is_absolute() else base / candidate).resolve()
        inside = full == base or base in full.parents
        exists = inside and full.exists()
    except (OSError, ValueError, RuntimeError):  # too long, bad characters, symlink loops
        raise InvalidRequest(f"the {what} path {value[:200]!r} cannot be used", field=field) from None
    if not inside:
        raise InvalidRequest(f"the {what} path must lie under the server's {what} root", field=field)
    if not exists:
        raise InvalidRequest(f"no {what} at {value!r} under the server's {what} root", field=field)
    return full
