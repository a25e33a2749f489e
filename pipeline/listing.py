"""The listing of a PhraseCut split, grouped per image, in constant memory: a SQLite file on local scratch.

``refer_{split}.json`` is one JSON list of tasks, and the tasks of one image need not be adjacent, so
grouping them needs every task at hand. Held as Python objects that is about 46 KB per image on PhraseCut
(4 GB for the train split); here one streaming pass (:func:`pipeline.jsonstream.iter_json_list`) checks
each task and stores its exact JSON text in a SQLite table keyed by image, and a second streaming pass
attaches each image's row of ``image_data_split.json``. Memory is a chunk of the file plus SQLite's page
cache, whatever the split's size; the scratch file is about the size of the refer file and is deleted on
:meth:`Listing.close`.

The checks are those of the in-memory listing they replace: schema errors and repeated task ids (the first
is kept) become quarantine rows attached to the image, tasks without a usable image id go to one entry with
``image_id=None`` (last). Entries come back as :class:`~pipeline.phrasecut_format.ImageEntry`, or as a compact
:data:`PackedEntry` (JSON text, parsed where it is used) to ship to another process.

Other layouts (:mod:`pipeline.refer`) feed the same tables through a :class:`Feed`: raw tasks of the same
form and metadata rows from a reader, plus the quarantine rows the reader found itself, under the same
checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline.jsonstream import iter_json_list
from pipeline.phrasecut_format import METADATA_FILES, ImageEntry, schema_error
from pipeline.schema import QuarantineRecord, make_key

# (image_id as JSON or None for the orphans, metadata row as JSON or None, task JSON texts, issue dicts)
PackedEntry = tuple[str | None, str | None, list[str], list[dict[str, Any]]]

_SCHEMA = """
CREATE TABLE images (image TEXT PRIMARY KEY, key TEXT NOT NULL, image_id TEXT NOT NULL,
                     first INTEGER NOT NULL, meta TEXT);
CREATE TABLE tasks (seq INTEGER PRIMARY KEY, image TEXT, body TEXT NOT NULL);
CREATE TABLE issues (seq INTEGER PRIMARY KEY, image TEXT, body TEXT NOT NULL);
CREATE TABLE task_ids (task_id TEXT PRIMARY KEY) WITHOUT ROWID;
"""
_INDEXES = """
CREATE INDEX images_by_key ON images (key, first);
CREATE INDEX images_by_first ON images (first);
CREATE INDEX tasks_by_image ON tasks (image, seq);
CREATE INDEX issues_by_image ON issues (image, seq);
"""
_BATCH = 5000


def metadata_path(root: str | os.PathLike[str]) -> str:
    for name in METADATA_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{root}: neither of {', '.join(METADATA_FILES)} exists")


def iter_metadata(root: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(str(image_id), row)`` per row of the metadata file, streamed; rows without an image_id skipped."""
    for row in iter_json_list(metadata_path(root)):
        if isinstance(row, dict) and "image_id" in row:
            # keyed by str so that "123" in a task and 123 in the metadata still meet
            yield str(row["image_id"]), row


@dataclasses.dataclass
class Feed:
    """A reader's records for a :class:`Listing`, instead of PhraseCut's ``refer_{split}.json``.

    ``items`` yields ``(raw task, label)`` or ``(QuarantineRecord, label)`` in file order: a raw task is
    checked like a PhraseCut task (``schema``, then its task_id against earlier ones); a quarantine row
    (a record the reader already set aside) is attached to its image. ``label`` names the record in
    quarantine details (``"sentence 5 (ref 2, #1)"``). ``metadata`` yields the image rows
    (``image_id``, ``width``, ``height``, ``file_name``); ``image_root`` is the folder images are read from,
    by their row's ``file_name``.
    """

    items: Iterable[tuple[Any, str]]
    metadata: Iterable[Any]
    source_file: str
    meta_file: str
    image_root: str
    schema: Callable[[Any], str | None] = schema_error


class Listing:
    """The tasks of ``refer_{split}.json`` (or of a :class:`Feed`) grouped per image, on local scratch (see
    the module docstring).

    Use as a context manager, or call :meth:`close`. ``scratch`` is the folder for the SQLite file
    (default: the system temp folder); it must be local to this process, never shared storage.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        source: str = "phrasecut",
        scratch: str | None = None,
        feed: Feed | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.split = split
        self.source = source
        if feed is None:
            self.source_file = f"refer_{split}.json"
            meta_path = metadata_path(self.root)  # fail before the long pass when it is missing
            self.meta_file = METADATA_FILES[0]
            self.image_root: str | None = None
            path = os.path.join(self.root, self.source_file)
            items: Iterable[tuple[Any, str | None, str]] = (
                (task, text, f"task #{index}")
                for index, (task, text) in enumerate(iter_json_list(path, with_text=True))
            )
            rows: Iterable[Any] = iter_json_list(meta_path)
            schema: Callable[[Any], str | None] = schema_error
        else:
            self.source_file, self.meta_file = feed.source_file, feed.meta_file
            self.image_root = feed.image_root
            items = ((item, None, label) for item, label in feed.items)
            rows, schema = feed.metadata, feed.schema
        self._dir = tempfile.mkdtemp(prefix="segvlm-listing-", dir=scratch)
        self._db = sqlite3.connect(os.path.join(self._dir, "listing.sqlite"), isolation_level=None)
        try:
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000", "temp_store=FILE"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.executescript(_SCHEMA)
            self._load_tasks(items, schema)
            self._load_metadata(rows)
            self._db.executescript(_INDEXES)
        except BaseException:
            self.close()
            raise
        count = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
        self.has_orphans = bool(
            self._db.execute(
                "SELECT EXISTS(SELECT 1 FROM tasks WHERE image IS NULL)"
                " OR EXISTS(SELECT 1 FROM issues WHERE image IS NULL)"
            ).fetchone()[0]
        )
        self.num_images = count
        self.num_tasks = self._db.execute("SELECT count(*) FROM tasks").fetchone()[0]
        self.num_issues = self._db.execute("SELECT count(*) FROM issues").fetchone()[0]

    # ----------------------------------------------------------------------------------------- building

    def _load_tasks(
        self, items: Iterable[tuple[Any, str | None, str]], schema: Callable[[Any], str | None]
    ) -> None:
        """Store ``(raw task or quarantine row, its JSON text or None, label)`` items, checking the tasks."""
        from pipeline.quarantine import BAD_SCHEMA, DUPLICATE_TASK_ID

        source_file = self.source_file
        db = self._db
        known: set[str] = set()  # image groups seen so far in this batch (the table has the rest)
        tasks: list[tuple[int, str | None, str]] = []
        issues: list[tuple[int, str | None, str]] = []
        images: list[tuple[str, str, str, int]] = []

        def flush() -> None:
            db.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, NULL)", images)
            db.executemany("INSERT INTO tasks VALUES (?, ?, ?)", tasks)
            db.executemany("INSERT INTO issues VALUES (?, ?, ?)", issues)
            images.clear(), tasks.clear(), issues.clear(), known.clear()

        def issue(index: int, image: str | None, record: QuarantineRecord) -> None:
            issues.append((index, image, json.dumps(record.to_dict())))

        db.execute("BEGIN")
        for index, (task, text, label) in enumerate(items):
            set_aside = isinstance(task, QuarantineRecord)
            if set_aside:
                image_id = task.image_id
            else:
                image_id = task.get("image_id") if isinstance(task, dict) else None
            groupable = isinstance(image_id, int | str) and not isinstance(image_id, bool)
            image = str(image_id) if groupable else None
            if groupable and image not in known:
                known.add(image)
                images.append((image, make_key(self.source, image_id), json.dumps(image_id), index))
            if set_aside:
                issue(index, image, task)
                continue
            task_id = task.get("task_id") if isinstance(task, dict) else None
            record = task_id if isinstance(task_id, str) and task_id else f"#{index}"
            error = schema(task)
            if error is not None:
                issue(index, image, QuarantineRecord(
                    source_file=source_file, record=record, reason=BAD_SCHEMA,
                    detail=f"{label} in {source_file}: {error}",
                    image_id=image_id if groupable else None,
                    task_id=task_id if isinstance(task_id, str) else None,
                ))  # fmt: skip
            elif db.execute("INSERT OR IGNORE INTO task_ids VALUES (?)", (task_id,)).rowcount == 0:
                issue(index, image, QuarantineRecord(
                    source_file=source_file, record=task_id, reason=DUPLICATE_TASK_ID,
                    detail=f"{label} in {source_file} repeats task_id {task_id!r}; the first is kept",
                    image_id=image_id, task_id=task_id,
                ))  # fmt: skip
            else:
                tasks.append((index, image, text if text is not None else json.dumps(task)))
            if len(tasks) + len(issues) >= _BATCH:
                flush()
        flush()
        db.execute("COMMIT")

    def _load_metadata(self, rows: Iterable[Any]) -> None:
        db = self._db
        db.execute("BEGIN")
        batch: list[tuple[str, str]] = []
        for row in rows:
            if isinstance(row, dict) and "image_id" in row:
                batch.append((json.dumps(row), str(row["image_id"])))
            if len(batch) >= _BATCH:
                db.executemany("UPDATE images SET meta = ? WHERE image = ?", batch)  # the last row wins
                batch.clear()
        db.executemany("UPDATE images SET meta = ? WHERE image = ?", batch)
        db.execute("COMMIT")

    # ---------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return self.num_images + int(self.has_orphans)

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        db, self._db = getattr(self, "_db", None), None
        if db is not None:
            db.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def images(self, order: str = "key") -> Iterator[tuple[str, str | None, int | str | None]]:
        """``(key, image, image_id)`` per entry, by key (``order="key"``) or by first appearance
        (``"first"``); the orphans' entry (``image=None``) comes last, under ``orphans_key``."""
        column = "key, first" if order == "key" else "first"
        cursor = self._db.execute(f"SELECT key, image, image_id FROM images ORDER BY {column}")
        for key, image, image_id in cursor:
            yield key, image, json.loads(image_id)
        if self.has_orphans:
            yield ORPHANS_KEY, None, None

    def packed(self, images: Iterable[str | None]) -> list[PackedEntry]:
        """The entries of ``images`` (``None``: the orphans) as compact JSON texts, for another process."""
        out: list[PackedEntry] = []
        db = self._db
        for image in images:
            if image is None:
                image_id, meta = None, None
                where, args = "image IS NULL", ()
            else:
                image_id, meta = db.execute(
                    "SELECT image_id, meta FROM images WHERE image = ?", (image,)
                ).fetchone()
                where, args = "image = ?", (image,)
            tasks = [row[0] for row in db.execute(f"SELECT body FROM tasks WHERE {where} ORDER BY seq", args)]
            issues = [
                json.loads(row[0])
                for row in db.execute(f"SELECT body FROM issues WHERE {where} ORDER BY seq", args)
            ]
            out.append((image_id, meta, tasks, issues))
        return out

    def entries(self, order: str = "key", batch: int = 512) -> Iterator[Any]:
        """Every :class:`~pipeline.phrasecut_format.ImageEntry`, streamed (see :meth:`images` for the order)."""
        pending: list[str | None] = []
        for _, image, _ in self.images(order):
            pending.append(image)
            if len(pending) >= batch:
                yield from (self.unpack(p) for p in self.packed(pending))
                pending = []
        yield from (self.unpack(p) for p in self.packed(pending))

    def unpack(self, packed: PackedEntry) -> Any:
        """The :class:`~pipeline.phrasecut_format.ImageEntry` of one of this listing's packed entries."""
        return unpack(
            packed, self.split, self.source_file, meta_file=self.meta_file, image_root=self.image_root
        )

    def image_path(self, image: str) -> tuple[str, str]:
        """``(folder, path relative to it)`` of an image group's file, as the reader will look for it."""
        entry = self.unpack(self.packed([image])[0])
        return entry.image_root or self.root, entry.image_file


ORPHANS_KEY = "~orphans"  # the entry of tasks with no usable image_id; sorts after every key


def unpack(
    packed: PackedEntry,
    split: str,
    source_file: str,
    *,
    meta_file: str = METADATA_FILES[0],
    image_root: str | None = None,
) -> Any:
    """The :class:`~pipeline.phrasecut_format.ImageEntry` of a :data:`PackedEntry`.

    With ``image_root`` (COCO layouts) the image is the metadata row's ``file_name`` under that folder; a row
    without a string ``file_name`` leaves ``file_name`` None, which the reader quarantines.
    """
    image_id, meta_text, tasks, issues = packed
    meta = None if meta_text is None else json.loads(meta_text)
    file_name = None
    if image_root is not None and isinstance(meta, dict) and isinstance(meta.get("file_name"), str):
        file_name = meta["file_name"]
    return ImageEntry(
        image_id=None if image_id is None else json.loads(image_id),
        split=split,
        meta=meta,
        tasks=[json.loads(text) for text in tasks],
        source_file=source_file,
        issues=[QuarantineRecord(**issue) for issue in issues],
        meta_file=meta_file,
        file_name=file_name,
        image_root=image_root,
    )


def packed_image_file(packed: PackedEntry) -> str | None:
    """``images/{image_id}.jpg`` of a packed entry (None for the orphans), as ``ImageEntry.image_file``."""
    return None if packed[0] is None else f"images/{json.loads(packed[0])}.jpg"
