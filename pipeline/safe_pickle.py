"""Reading a pickle of plain data without running anything it asks for.

The refer toolkit ships its expressions as a pickle (``refs(unc).p``, written by Python 2 with protocol 2).
Unpickling runs code: any global a pickle names (``os.system``, ``builtins.exec``) is imported and called.
:class:`PlainDataUnpickler` refuses every global and every persistent id, so what comes out is made of
the containers and scalars the pickle opcodes build by themselves: dict, list, tuple, set (protocol 4's
own opcodes), str, bytes, int, float, bool and None. Python 2 ``str`` values (bytes) are decoded as UTF-8
with ``surrogateescape``: undecodable bytes neither vanish nor fail the whole file, they become lone
surrogates that the text checks (pipeline.validate.text_error) quarantine as ``bad_text`` with the record
that holds them.

:func:`load_plain_pickle` is the only way the project reads a pickle from data.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

MAX_PICKLE_BYTES = 512 << 20  # refcocog's refs(umd).p is about 30 MB; the whole file is held in memory


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for code (a global or a persistent id), or is too large to read."""


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only (see the module docstring); ``path`` names the file in errors."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="utf-8", errors="surrogateescape")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.path}: the pickle asks for the global {module}.{name}; refused, only plain data "
            "(dict, list, tuple, set, str, bytes, numbers, bool, None) is accepted"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.path}: the pickle holds a persistent id ({str(pid)[:60]!r}); refused, only plain data "
            "is accepted"
        )


def load_plain_pickle(path: str | os.PathLike[str], max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """The plain data in the pickle file at ``path`` (at most ``max_bytes``; read whole into memory).

    Raises :class:`UnsafePickleError` when it asks for code or is too large, and ``pickle.UnpicklingError``
    (the file named) when it is not one complete pickle: truncated, garbage, or followed by more bytes.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafePickleError(f"{path}: larger than the limit of {max_bytes} bytes for a pickle")
    buffer = io.BytesIO(data)
    try:
        value = PlainDataUnpickler(buffer, path).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # the C unpickler raises several types for garbage
        raise pickle.UnpicklingError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err
    if buffer.tell() != len(data):
        raise pickle.UnpicklingError(
            f"{path}: {len(data) - buffer.tell()} bytes follow the pickle's end (one pickle expected)"
        )
    return value
