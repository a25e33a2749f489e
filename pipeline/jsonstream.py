"""Stream the items of a JSON file whose top level is one list, in constant memory.

PhraseCut's ``refer_train.json`` is a list of about 310k task objects (hundreds of MB); ``json.load`` turns
it into Python objects that take several times the file's size. :func:`iter_json_list` reads the file in
chunks and decodes one item at a time with the standard library's C decoder (``raw_decode``), so memory
stays at a chunk plus one item whatever the file's size, and values are exactly what ``json.load`` gives.

Errors name the file and the byte offset (plus line and column) of the fault: invalid UTF-8, a truncated
file, a syntax error, anything after the closing bracket. An item larger than ``max_item_bytes`` is an
error too, so a hostile file cannot make the reader buffer it whole.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from typing import Any

CHUNK_CHARS = 1 << 20
MAX_ITEM_BYTES = 64 << 20
_SPACE = re.compile(r"[ \t\n\r]*")


class JSONStreamError(ValueError):
    """A JSON list file that cannot be read; ``path``, ``offset`` (bytes) and ``reason`` say where and why."""

    def __init__(
        self, path: str, offset: int, reason: str, line: int | None = None, column: int | None = None
    ):
        where = f"byte {offset}" + (f" (line {line}, column {column})" if line is not None else "")
        super().__init__(f"{path}: {reason} at {where}")
        self.path, self.offset, self.reason, self.line, self.column = path, offset, reason, line, column


class _Reader:
    """Decoded text of a binary file, a window at a time, mapping window positions back to file bytes."""

    def __init__(self, path: str, chunk_chars: int) -> None:
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.chunk = chunk_chars
        self.text = ""  # the window
        self.base = 0  # file byte offset of text[0]
        self.line = 1  # line number of text[0]
        self.line_start = 0  # file byte offset where that line starts (for columns)
        self.read_bytes = 0
        self.eof = False

    def close(self) -> None:
        self.file.close()

    def more(self) -> bool:
        """Append the next chunk to the window; False at the end of the file."""
        if self.eof:
            return False
        data = self.file.read(self.chunk)
        pending = len(self.decoder.getstate()[0])  # bytes of a split character held from the last chunk
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            offset = self.read_bytes - pending + err.start
            raise JSONStreamError(
                self.path, offset, f"invalid UTF-8 (byte 0x{err.object[err.start]:02x})"
            ) from None
        self.read_bytes += len(data)
        self.eof = not data
        self.text += text
        return bool(data)

    def drop(self, pos: int) -> int:
        """Forget text[:pos] (consumed); returns the position's new index (0)."""
        gone = self.text[:pos]
        size = len(gone.encode("utf-8"))
        newlines = gone.count("\n")
        if newlines:
            self.line += newlines
            self.line_start = self.base + len(gone[: gone.rindex("\n") + 1].encode("utf-8"))
        self.base += size
        self.text = self.text[pos:]
        return 0

    def error(self, pos: int, reason: str) -> JSONStreamError:
        before = self.text[:pos]
        offset = self.base + len(before.encode("utf-8"))
        line, line_start = self.line, self.line_start
        if "\n" in before:
            line += before.count("\n")
            line_start = self.base + len(before[: before.rindex("\n") + 1].encode("utf-8"))
        return JSONStreamError(self.path, offset, reason, line, offset - line_start + 1)

    def skip_space(self, pos: int) -> int:
        """Index of the next non-space character (reading more as needed); len(text) at the end of file."""
        while True:
            pos = _SPACE.match(self.text, pos).end()
            if pos < len(self.text) or not self.more():
                return pos


def iter_json_list(
    path: str | os.PathLike[str],
    *,
    chunk_chars: int = CHUNK_CHARS,
    max_item_bytes: int = MAX_ITEM_BYTES,
    with_text: bool = False,
) -> Iterator[Any]:
    """Yield the items of the JSON list in ``path`` one at a time (``(item, raw_text)`` with ``with_text``).

    ``raw_text`` is the item's exact JSON text from the file: a consumer that stores items for later can keep
    the text instead of re-encoding the object. Raises :class:`JSONStreamError` (a ``ValueError``) naming
    the file and byte offset when the file is not a well-formed JSON list in UTF-8.
    """
    path = os.fspath(path)
    decoder = json.JSONDecoder()
    reader = _Reader(path, chunk_chars)
    try:
        pos = reader.skip_space(0)
        if pos >= len(reader.text):
            raise reader.error(pos, "empty file, expected a JSON list")
        if reader.text[pos] != "[":
            raise reader.error(pos, f"expected a JSON list ('['), found {reader.text[pos]!r}")
        pos = reader.skip_space(pos + 1)
        if pos < len(reader.text) and reader.text[pos] == "]":
            pos += 1
        else:
            while True:
                if pos > chunk_chars:  # keep the window about one chunk long
                    pos = reader.drop(pos)
                if pos >= len(reader.text):
                    raise reader.error(pos, "file ends inside the list (truncated?)")
                while True:
                    try:
                        item, end = decoder.raw_decode(reader.text, pos)
                    except json.JSONDecodeError as err:
                        # incomplete in this window, or really invalid: read on until the file ends
                        if len(reader.text) - pos > max_item_bytes:
                            raise reader.error(pos, f"item larger than {max_item_bytes} bytes") from None
                        if reader.more():
                            continue
                        rest = reader.skip_space(err.pos)
                        if rest >= len(reader.text) or err.msg.startswith("Unterminated string"):
                            raise reader.error(err.pos, "file ends inside an item (truncated?)") from None
                        raise reader.error(err.pos, f"invalid JSON ({err.msg})") from None
                    # a number near the window's end may go on in the next chunk ("1" of "1e5")
                    if isinstance(item, int | float) and len(reader.text) - end < 64 and reader.more():
                        continue
                    break
                yield (item, reader.text[pos:end]) if with_text else item
                pos = reader.skip_space(end)
                if pos >= len(reader.text):
                    raise reader.error(pos, "file ends inside the list (truncated?)")
                if reader.text[pos] == "]":
                    pos += 1
                    break
                if reader.text[pos] != ",":
                    raise reader.error(
                        pos, f"expected ',' or ']' after a list item, found {reader.text[pos]!r}"
                    )
                pos = reader.skip_space(pos + 1)
        pos = reader.skip_space(pos)
        if pos < len(reader.text):
            raise reader.error(pos, "extra data after the list")
    finally:
        reader.close()
