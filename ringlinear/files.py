"""Files written so that a reader never sees half of them: a directory is built beside its destination and
renamed into place (`write_atomically`), and file contents are identified by their SHA-256 (`sha256_file`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable

TMP_MARK = ".tmp-"  # the infix of a directory being written: `.{name}.tmp-XXXX` beside `name`


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: str | os.PathLike, write_into: Callable[[str], None]) -> None:
    """Make directory `path` by calling `write_into(tmp)` on a fresh sibling directory, fsync its files, then
    rename it over `path` (an existing `path` is replaced only once the new one is complete). On any error the
    sibling is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{TMP_MARK}", dir=parent)
    try:
        write_into(tmp)
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
