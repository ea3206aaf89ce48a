"""Replacing a directory of files as one unit: a reader sees the old directory or the new one, never half.

    with atomic_directory(path, marker="meta.json", files=(...)) as tmp:
        write every file into tmp

The files are written into a fresh hidden sibling ``.<name>.<random>.tmp``;
when the block ends they are fsynced and swapped in by two renames (the old
directory to ``.<name>.<random>.old``, the new one to ``<name>``), because
POSIX cannot rename a directory over a non-empty one. If the block raises,
the sibling is removed and ``<name>`` is untouched.

What a crash can leave, and who cleans it up:

- a ``.tmp`` sibling (killed while writing): the next write of ``<name>``
  removes it;
- ``<name>`` missing and an ``.old`` sibling holding the previous directory
  (killed exactly between the two renames): ``previous_version`` finds it
  for a reader, and the next write puts it back first.

Only hidden siblings with this writer's own name pattern are ever removed,
and the unversioned ``<name>.tmp`` / ``<name>.old`` of earlier npflux
versions only when they hold nothing but the format's own ``files``: a
user's ``notes.old`` directory is never touched. One process writes a given
directory at a time.

``save_checkpoint`` writes through here (marker ``meta.json``); a retrieval
index is the same kind of directory (marker ``index.json``).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
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


def _ours(directory: Path, tag: str):
    """This writer's hidden ``tag`` siblings of ``directory`` (``.<name>.<8 hex>.<tag>``), newest first."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.[0-9a-f]{{8}}\.{tag}")
    if not directory.parent.is_dir():
        return []
    found = [p for p in directory.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _legacy(directory: Path, tag: str, files) -> Path | None:
    """``<name>.<tag>`` as earlier npflux versions named it, when it holds only the format's files."""
    path = directory.with_name(f"{directory.name}.{tag}")
    if path.is_dir():
        entries = list(path.iterdir())
        if entries and all(p.is_file() and p.name in files for p in entries):
            return path
    return None


def previous_version(directory, marker: str, files=()) -> Path | None:
    """Where the previous ``directory`` waits when a crash fell between the swap's renames (else None)."""
    directory = Path(directory)
    candidates = _ours(directory, "old") + [p for p in [_legacy(directory, "old", files)] if p]
    return next((p for p in candidates if (p / marker).is_file()), None)


def _unused(directory: Path, tag: str) -> Path:
    """A sibling name of this writer's pattern that nothing has."""
    while True:
        path = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.{tag}")
        if not os.path.lexists(path):
            return path


def _clean_up(directory: Path, marker: str, files):
    """Put back a previous version stranded by a crash; remove what earlier crashed writes left."""
    if not directory.exists():
        previous = previous_version(directory, marker, files)
        if previous is not None:
            os.replace(previous, directory)
            fsync_dir(directory.parent)
    debris = _ours(directory, "tmp") + [p for p in [_legacy(directory, "tmp", files)] if p]
    if directory.exists():  # an .old beside a whole directory is a swap that was not cleaned up
        debris += _ours(directory, "old") + [p for p in [_legacy(directory, "old", files)] if p]
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(directory, marker: str, files=()):
    """Yield an empty temporary directory; when the block succeeds, it replaces ``directory`` whole.

    ``marker`` is the file every finished directory of this format holds
    (``meta.json``, ``index.json``): a non-empty ``directory`` without it is
    not this format's, and is never replaced (FileExistsError). ``files``
    names every file the format writes (``marker`` included), which is how
    the unversioned leftovers of earlier npflux versions are recognised.
    """
    directory = Path(directory)
    files = set(files) | {marker}
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / marker).is_file():
        raise FileExistsError(f"{directory} exists, is not empty and holds no {marker}; refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _clean_up(directory, marker, files)
    tmp = _unused(directory, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed process leaves it; the next write removes it
        raise

    # The swap. Until the first rename, `directory` is the old version, whole.
    old = None
    if directory.exists():
        old = _unused(directory, "old")
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_directory", "fsync_dir", "fsync_file", "previous_version"]
