"""Storage locations: a local folder or a URI, read and written the same way everywhere.

Every place segvlm reads or writes data (shards, Ray Train checkpoints, the best checkpoint, evaluation
reports, official PNGs) takes a *location*: a local path, or a URI that ``pyarrow.fs.FileSystem.from_uri``
opens (``s3://``, ``gs://``, ``hdfs://``, ``file://``) or, failing that, an fsspec protocol
(``pipeline.shards.resolve``). S3 settings come from the standard AWS environment of the process:
``AWS_ENDPOINT_URL`` (MinIO, SeaweedFS...), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or an instance
profile, ``AWS_REGION``. Nothing is ever opened through a shell: webdataset's ``pipe:`` URLs (and any scheme
no filesystem knows) are refused with an error naming the location.

Nothing here assumes a disk shared between nodes: a worker that needs a remote folder locally downloads it
(``local_copy``) into its own temporary folder, and results go back through a location or through Ray.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline import shards
from segvlm.atomic import publish_dir

__all__ = [
    "StorageError",
    "check_location",
    "download_dir",
    "exists",
    "forwarded_env",
    "is_dir",
    "is_uri",
    "join",
    "list_files",
    "local_copy",
    "name",
    "open_input",
    "parent",
    "read_bytes",
    "resolve",
    "upload_dir",
    "write_bytes",
]

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
# read buffer for streaming shards: tarfile reads 10 KiB at a time, which on S3 would be one request each
READ_BUFFER = 8 << 20
# settings that point every node at the same object store; credentials are deliberately not in this list
# (they would be visible in the Ray dashboard's job description): each node has its own, or an instance role
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


class StorageError(ValueError):
    """A location that cannot be opened: a ``pipe:`` URL or a scheme no filesystem knows."""


def is_uri(location: str | os.PathLike) -> bool:
    """``scheme://...`` (``s3://b/x``, ``file:///x``); a plain path is not."""
    return "://" in os.fspath(location)


def check_location(location: str | os.PathLike) -> str:
    """The location as a string, or ``StorageError`` for one that must not or cannot be opened."""
    text = os.fspath(location)
    match = _SCHEME.match(text)
    if match and match["scheme"].lower() == "pipe":
        raise StorageError(
            f"{text!r}: 'pipe:' locations run a shell command and are refused; "
            "give a folder or a URI (s3://bucket/path, gs://..., file://...)"
        )
    if match and "://" not in text and len(match["scheme"]) > 1:
        raise StorageError(f"{text!r}: not a path or a scheme://... URI")
    return text


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    """One filesystem per (scheme, bucket) and process: building an S3 client costs a few ms and may
    probe the bucket's region, so it is not done once per shard."""
    fs, _ = shards.resolve(f"{scheme}://{netloc}/")
    return fs


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or a URI; refuses ``pipe:`` and unknown schemes."""
    text = check_location(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    parts = urlsplit(text)
    try:
        if parts.scheme in ("s3", "gs", "gcs") and parts.netloc:
            fs = _filesystem(parts.scheme, parts.netloc)
            return fs, f"{parts.netloc}{parts.path}".rstrip("/") or parts.netloc
        return shards.resolve(text)
    except (ValueError, ImportError) as err:
        raise StorageError(f"{text!r}: no filesystem opens this location ({err})") from err


def join(location: str | os.PathLike, *parts: str) -> str:
    """``join("s3://b/runs", "x", "y.json") == "s3://b/runs/x/y.json"``; local paths join as paths."""
    text = os.fspath(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def parent(location: str | os.PathLike) -> str:
    text = os.fspath(location).rstrip("/")
    if is_uri(text):
        head, _, _ = text.rpartition("/")
        return head
    return os.path.dirname(os.path.abspath(text))


def name(location: str | os.PathLike) -> str:
    return os.fspath(location).rstrip("/").rpartition("/")[2]


def exists(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(location: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Files under a folder as locations of the same kind (URIs stay URIs), sorted; [] for a missing one."""
    text = os.fspath(location).rstrip("/")
    fs, base = resolve(text)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
    return sorted(
        join(text, posixpath.relpath(info.path, base)) for info in infos if info.type == pafs.FileType.File
    )


def open_input(location: str | os.PathLike):
    """A buffered, forward-only binary stream (a ``pyarrow.NativeFile``: ``read``, ``close``)."""
    fs, path = resolve(location)
    return fs.open_input_stream(path, compression=None, buffer_size=READ_BUFFER)


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    return shards.read_bytes(fs, path)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Atomic from a reader's view: a temp name, then a rename (on S3 a copy: the object appears whole)."""
    fs, path = resolve(location)
    shards.write_bytes_atomic(fs, path, data)


def download_dir(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy the folder at ``location`` into ``local_dir`` (created) and return ``local_dir``."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{os.fspath(location)}: no such folder")
    target = Path(local_dir)
    target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> str:
    """Replace the folder at ``location`` by a copy of ``local_dir``; returns ``location``.

    Local targets are written under a temporary sibling and renamed (atomic). Object stores have no folder
    rename: the old objects are deleted, then every file is uploaded, ``meta.json`` (what
    ``segvlm.checkpoint`` reads first) last, so an interrupted upload is an incomplete checkpoint that fails
    to load rather than a mix of two.
    """
    source = Path(local_dir)
    text = os.fspath(location)
    fs, path = resolve(text)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(source, tmp)
            publish_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return text
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    files = sorted(
        (p for p in source.rglob("*") if p.is_file()), key=lambda p: (p.name == "meta.json", str(p))
    )
    for file in files:
        relative = file.relative_to(source).as_posix()
        destination = posixpath.join(path, relative)
        fs.create_dir(posixpath.dirname(destination), recursive=True)
        with open(file, "rb") as src, fs.open_output_stream(destination) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    return text


@contextlib.contextmanager
def local_copy(location: str | os.PathLike, prefix: str = "segvlm-") -> Iterator[Path]:
    """A local folder with the content of ``location``: the folder itself when it is local, else a download
    into a temporary folder of this process (node-local, removed on exit)."""
    text = check_location(location)
    fs, path = resolve(text)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield download_dir(text, Path(tmp) / name(text))


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The object-store settings of this process that Ray workers on other nodes need too (no secrets)."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in FORWARDED_ENV if environ.get(key)}
