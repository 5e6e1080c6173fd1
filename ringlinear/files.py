"""Files written so that a reader never sees half of them: a directory is built beside its destination and
renamed into place (`write_atomically`); what an interrupted write leaves behind is found and removed
(`remove_interrupted`); file contents are identified by their SHA-256 (`sha256_file`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable

TMP_MARK = ".tmp-"  # the infix of a directory being written: `.{name}.tmp-XXXX` beside `name`
OLD_MARK = ".old-"  # the infix of a directory being replaced: `.{name}.old-XXXX`, removed once `name` is new
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)(?P<mark>\.tmp-|\.old-)[^/]*$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename into it) durable: a rename is only on disk once its parent is
    synced. A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path`, then every directory (bottom up)."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def temp_dir_for(path: str | os.PathLike, tag: str | None = None) -> str:
    """A fresh directory beside `path` named `.{name}.tmp-...` (what `remove_interrupted` recognises); with `tag`,
    exactly `.{name}.tmp-{tag}` (several processes writing one directory agree on its name), emptied first."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if tag is None:
        return tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
    tmp = os.path.join(parent, f".{name}{TMP_MARK}{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, path: str | os.PathLike) -> None:
    """Sync the complete directory `tmp` and rename it over `path` (an existing `path` is moved aside first and
    removed after; a crash between the two renames leaves `.{name}.old-*`, which `remove_interrupted` restores)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    fsync_tree(tmp)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{name}{OLD_MARK}", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_atomically(path: str | os.PathLike, write_into: Callable[[str], None]) -> None:
    """Make directory `path` by calling `write_into(tmp)` on a fresh sibling directory, fsync its files, then
    rename it over `path` (an existing `path` is replaced only once the new one is complete). On any error the
    sibling is removed and `path` is left as it was; a process killed meanwhile leaves the sibling, which
    `remove_interrupted` removes."""
    tmp = temp_dir_for(path)
    try:
        write_into(tmp)
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_atomically(path: str | os.PathLike) -> None:
    """Delete directory `path` so that a reader sees it whole or not at all: renamed to a `.{name}.tmp-*` sibling
    first (a kill during the removal leaves that, which `remove_interrupted` finishes), then removed."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path)
    doomed = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
    os.rmdir(doomed)
    os.rename(path, doomed)
    fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_interrupted(parent: str | os.PathLike) -> list[str]:
    """Clean up after `write_atomically` calls in `parent` that a killed process never finished: every
    `.{name}.tmp-*` directory (or file) is removed (its write never completed), and a `.{name}.old-*` directory is renamed
    back to `name` when `name` is missing (killed between moving the old one aside and renaming the new one in),
    else removed. Only call it while nothing writes into `parent`. Returns the paths removed or restored."""
    if not os.path.isdir(parent):
        return []
    done = []
    for entry in sorted(os.listdir(parent)):
        m = _LEFTOVER.match(entry)
        full = os.path.join(parent, entry)
        if not m or os.path.islink(full):
            continue
        target = os.path.join(parent, m.group("name"))
        if os.path.isfile(full):  # a file written beside its destination and renamed (`.history.json.tmp-PID`)
            if m.group("mark") == TMP_MARK:
                os.remove(full)
                done.append(full)
            continue
        if m.group("mark") == OLD_MARK and not os.path.exists(target):
            os.rename(full, target)
        else:
            shutil.rmtree(full, ignore_errors=True)
        done.append(full)
    if done:
        fsync_dir(parent)
    return done
