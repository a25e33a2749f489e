"""WebDataset shard I/O on any pyarrow filesystem: deterministic, atomic writes and strict reads.

A shard ``{split}-{000000}.tar`` holds one sample per image: ``{key}.jpg`` (the bytes) and
``{key}.json`` (``ImageRecord.to_json()``, via the faster equivalent :func:`record_json`). Writes go to ``{name}.tmp-<uuid>`` and are renamed when the tar
is complete, so a crash never leaves a final name pointing at a truncated tar. On a local disk the temp file
is fsynced before the rename (and the folder after it), so a power cut cannot publish a name whose bytes
never reached the disk. On object stores (S3, GCS) an object exists only once its upload completed, and
a rename is a server-side copy plus a delete: still atomic from a reader's point of view (the final object
appears whole or not at all) but it costs one extra copy of the shard.

Temp names carry the id of the run that writes them, ``{name}.tmp-{run_id}-{random}``, so a job cleaning
up after a crashed run removes that run's leftovers only (:func:`remove_temp_files`), never the files
another live writer is still producing.

Output locations are a local folder or a URI: ``pyarrow.fs.FileSystem.from_uri`` schemes (``s3://``,
``gs://``, ``hdfs://``, ``file://``, ``mock://``) and, as a fallback, any fsspec protocol (``memory://``,
``az://`` ...) wrapped in ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``. ``memory://`` and ``mock://``
live inside one process: fine for tests of this module, useless as the output of a Ray job, whose tasks
run in other processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs

from pipeline.schema import ImageRecord, Task
from segvlm import atomic

# Members are written with a fixed mtime/owner/mode so identical input gives identical bytes
# (reproducible shards hash the same, and a rerun can be verified against a previous one).
_MTIME = 0
_MODE = 0o444
_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
TMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"\.tmp-(?P<run>[0-9a-f]{12})-[0-9a-z]+$")
EXPECTED_EXTENSIONS = ("jpg", "json")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What a finished shard holds: enough to check it later without reading it."""

    name: str
    path: str
    samples: int
    bytes: int
    sha256: str
    keys: tuple[str, ...]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["keys"] = list(self.keys)
        return data


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """``("train", 3)`` for ``train-000003.tar``; ``None`` for anything else (temp files included)."""
    match = _SHARD_NAME.match(posixpath.basename(name))
    return (match["split"], int(match["index"])) if match else None


def resolve(
    dir_or_uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local folder or a URI; an explicit ``filesystem`` wins."""
    location = os.fspath(dir_or_uri)
    if filesystem is not None:
        return filesystem, location.rstrip("/") or "/"
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except ValueError as err:  # pyarrow's ArrowInvalid: a scheme it has no native filesystem for
        if "Unrecognized filesystem type" not in str(err):
            raise
        fs, path = _fsspec(location)
    return fs, path.rstrip("/") or "/"


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    # memory:// paths are absolute ("/bucket/x"); the handler expects what fsspec returns.
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def new_run_id() -> str:
    """A fresh id for one run of a job: 12 hex digits, the form temp names carry."""
    return uuid.uuid4().hex[:12]


def temp_path(path: str, run_id: str | None = None) -> str:
    """``{path}.tmp-{run_id}-{random}``: where a write of ``path`` by run ``run_id`` goes first."""
    if run_id is not None and not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise ValueError(f"run_id must be 12 hex digits, got {run_id!r}")
    return f"{path}{TMP_MARK}{run_id or new_run_id()}-{uuid.uuid4().hex[:8]}"


def temp_owner(name: str) -> str | None:
    """The run id in a temp file's name, or None when the name is not one of ours."""
    match = _TEMP_NAME.search(name)
    return match["run"] if match else None


def local_path(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The OS path behind ``path`` when ``filesystem`` is the local disk (maybe under a SubTree), else None."""
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        inner = local_path(filesystem.base_fs, filesystem.base_path)
        return None if inner is None else os.path.join(inner, path.lstrip("/"))
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    return None


@contextlib.contextmanager
def publishing(filesystem: pafs.FileSystem, path: str, run_id: str | None = None) -> Iterator:
    """Write to a temp name, publish as ``path`` when the block ends without error (else delete the temp).

    Yields a binary stream. Local disk: the file is fsynced, renamed, and its folder fsynced. Other
    filesystems: the upload completes when the stream closes, then the object is moved to ``path``.
    """
    parent = posixpath.dirname(path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    tmp = temp_path(path, run_id)
    local_tmp, local_final = local_path(filesystem, tmp), local_path(filesystem, path)
    try:
        if local_tmp is not None and local_final is not None:
            with open(local_tmp, "xb") as stream:
                yield stream
            atomic.publish_file(local_tmp, local_final)
        else:
            with filesystem.open_output_stream(tmp) as stream:
                yield stream
            filesystem.move(tmp, path)
    except BaseException:
        _delete_quietly(filesystem, tmp)
        raise


def join(base: str, *parts: str) -> str:
    """pyarrow filesystems use ``/`` separators everywhere."""
    return posixpath.join(base, *parts)


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what tarfile writes before passing it to the filesystem stream."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self._stream.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
_RECORD_FIELDS = tuple(
    f.name for f in dataclasses.fields(ImageRecord) if f.name not in ("tasks", "image_path")
)


def record_json(record: ImageRecord) -> bytes:
    """Byte-identical to ``record.to_json()`` (a test checks it), about 10x faster.

    ``to_json`` goes through ``dataclasses.asdict``, which deep-copies every polygon point; in a shard
    writer that copy was 40 % of the CPU time. The fields are plain JSON values, so no copy is needed.
    """
    data: dict = {name: getattr(record, name) for name in _RECORD_FIELDS}
    data["tasks"] = [{name: getattr(task, name) for name in _TASK_FIELDS} for task in record.tasks]
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(
    samples: Iterable[tuple[ImageRecord, bytes]],
    filesystem: pafs.FileSystem,
    path: str,
    *,
    run_id: str | None = None,
) -> ShardInfo:
    """Write ``samples`` sorted by key to ``path`` atomically (temp name, then rename); return its info.

    ``run_id`` goes into the temp name (see the module docstring). Duplicate keys raise: they would
    silently merge into one WebDataset sample when read.
    """
    ordered = sorted(samples, key=lambda sample: sample[0].key)
    keys = [record.key for record, _ in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in shard {path}")
    with publishing(filesystem, path, run_id) as stream:
        sink = _HashingWriter(stream)
        # GNU format without pax headers: no per-file timestamps or user names sneak in.
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for record, jpg in ordered:
                payload = record_json(record)
                tar.addfile(_member(f"{record.key}.jpg", len(jpg)), io.BytesIO(jpg))
                tar.addfile(_member(f"{record.key}.json", len(payload)), io.BytesIO(payload))
    return ShardInfo(
        name=posixpath.basename(path),
        path=path,
        samples=len(ordered),
        bytes=sink.size,
        sha256=sink.sha.hexdigest(),
        keys=tuple(keys),
    )


def file_sha256(filesystem: pafs.FileSystem, path: str, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a file, streamed: how a resumed job checks a shard it did not write."""
    digest = hashlib.sha256()
    size = 0
    with filesystem.open_input_stream(path) as stream:
        while data := stream.read(chunk):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        filesystem.delete_file(path)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext


def iter_shard(filesystem: pafs.FileSystem, path: str) -> Iterator[tuple[ImageRecord, bytes]]:
    """Yield ``(record, jpg bytes)`` per sample of one shard, streaming.

    Only regular ``.jpg``/``.json`` members are read; anything else (``.pyd``, ``.pickle``, links,
    directories) is skipped unread, so a tampered shard can never make us unpickle or follow a link.
    A sample missing either member raises ``ValueError`` (the shard is corrupt).
    """
    with filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        current: str | None = None
        parts: dict[str, bytes] = {}
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _split_member(member.name)
            if ext not in EXPECTED_EXTENSIONS:
                continue
            if key != current:
                if current is not None:
                    yield _sample(path, current, parts)
                current, parts = key, {}
            handle = tar.extractfile(member)
            parts[ext] = handle.read() if handle is not None else b""
        if current is not None:
            yield _sample(path, current, parts)


def _sample(path: str, key: str, parts: dict[str, bytes]) -> tuple[ImageRecord, bytes]:
    missing = [ext for ext in EXPECTED_EXTENSIONS if ext not in parts]
    if missing:
        raise ValueError(f"{path}: sample {key!r} lacks {missing}")
    record = ImageRecord.from_json(parts["json"])
    if record.key != key:
        raise ValueError(f"{path}: member key {key!r} does not match its json key {record.key!r}")
    return record, parts["jpg"]


def list_shards(
    dir_or_uri: str | os.PathLike, split: str | None = None, filesystem: pafs.FileSystem | None = None
) -> list[str]:
    """Final shard paths in a folder, sorted by name (temp files and other files excluded)."""
    fs, base = resolve(dir_or_uri, filesystem)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    paths = []
    for info in infos:
        parsed = parse_shard_name(info.base_name)
        if info.type == pafs.FileType.File and parsed and (split is None or parsed[0] == split):
            paths.append(info.path)
    return sorted(paths, key=posixpath.basename)


def iter_shard_set(
    dir_or_uri: str | os.PathLike, split: str | None = None, filesystem: pafs.FileSystem | None = None
) -> Iterator[tuple[ImageRecord, bytes]]:
    """All samples of all shards of a folder (optionally of one split), in shard-name order."""
    fs, _ = resolve(dir_or_uri, filesystem)
    for path in list_shards(dir_or_uri, split, filesystem):
        yield from iter_shard(fs, path)


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomic(
    filesystem: pafs.FileSystem, path: str, data: bytes, *, run_id: str | None = None
) -> None:
    """Small files (sidecars, sizes.json, manifest): temp name, fsync, rename, as for shards."""
    with publishing(filesystem, path, run_id) as stream:
        stream.write(data)


def write_json_atomic(
    filesystem: pafs.FileSystem, path: str, data: object, *, run_id: str | None = None
) -> None:
    write_bytes_atomic(filesystem, path, json.dumps(data, indent=1, sort_keys=True).encode(), run_id=run_id)


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def remove_temp_files(
    filesystem: pafs.FileSystem,
    base: str,
    recursive: bool = True,
    *,
    run_ids: Iterable[str] | None = None,
) -> list[str]:
    """Delete temp leftovers under ``base``; returns what was removed.

    With ``run_ids``, only the temp files those runs wrote (``*.tmp-{run_id}-*``): the caller knows those
    runs are over (a job holding the output's lock, cleaning up after the run it took over from). Without
    it, every ``*.tmp-*`` file: only for a caller that knows no other writer can be at work here.
    """
    owners = None if run_ids is None else set(run_ids)
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
    removed = []
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File or TMP_MARK not in info.base_name:
            continue
        if owners is not None and temp_owner(info.base_name) not in owners:
            continue
        _delete_quietly(filesystem, info.path)
        removed.append(info.path)
    return sorted(removed)


def temp_files(filesystem: pafs.FileSystem, base: str, recursive: bool = True) -> list[str]:
    """Every ``*.tmp-*`` file under ``base`` (whoever wrote it)."""
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
    return sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and TMP_MARK in info.base_name
    )
