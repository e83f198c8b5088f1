"""Folders densessl owns: the one rule for writing, replacing and deleting under a path a user can name.

A folder densessl writes into carries a marker file, ``.densessl``, written when the folder is claimed: a JSON
object whose ``kind`` says what it holds (``synthetic-set``, ``run``, ``outputs``, ...). Only such a folder is
ever written into, emptied or replaced; a folder that is not ours is refused with one line naming the option that
chose it, and nothing in it is touched. Why a marker and not a name or a guess: a user's ``~/imagenet`` may look
exactly like our output (an ImageFolder), and at 1.28M files a mistake is not undone.

Outputs written before markers existed are recognised by a ``legacy`` test that reads what only densessl writes
there (the embedded set's ``meta.json`` with its config and version, a run's ``config.yaml`` that parses as our
configuration), never by a file name alone, which a user's folder may share; they are marked on first use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

MARKER = ".densessl"


class NotOurs(ValueError):
    """A path densessl did not write, named by ``option``; the message is one line."""


def kind(folder: str | Path) -> str | None:
    """The kind in ``folder``'s marker, or None when it has none (or an unreadable one: not ours)."""
    try:
        value = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def json_keys(path: Path, *keys: str) -> bool:
    """Whether ``path`` holds a JSON object with all of ``keys``: a ``legacy`` test's building block."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and all(k in value for k in keys)


def check(folder: str | Path, what: str, option: str, legacy: Callable[[Path], bool] | None = None) -> bool:
    """``claim``'s verdict without writing anything: raises ``NotOurs``, or returns whether ``folder`` is marked
    as a ``what`` already."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise NotOurs(f"{option}={folder} is a broken link; choose an empty or new folder")
    if folder.exists() and not folder.is_dir():
        raise NotOurs(f"{option}={folder} is a file, not a folder; choose an empty or new folder")
    found = kind(folder) if folder.is_dir() else None
    if found is not None and found != what:
        raise NotOurs(f"{option}={folder} holds a densessl {found}, not a {what}; choose an empty or new folder")
    if found is None and folder.is_dir() and not _empty(folder) and not (legacy and legacy(folder)):
        raise NotOurs(f"{option}={folder} exists and was not written by densessl; choose an empty or new folder")
    return found == what


def claim(folder: str | Path, what: str, option: str, legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make ``folder`` ours to write into as a ``what`` and return it: created with its marker when missing or
    empty; kept when it carries a marker of the same kind (or, unmarked, passes the ``legacy`` test, then
    marked). Anything else raises ``NotOurs`` naming ``option``, and nothing is written."""
    folder = Path(folder)
    if check(folder, what, option, legacy):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"kind": what}) + "\n")
    os.replace(tmp, folder / MARKER)
    return folder


def replace(folder: str | Path, what: str, option: str, legacy: Callable[[Path], bool] | None = None) -> Path:
    """``folder`` claimed (``claim``'s rules) and emptied of everything but its marker: for outputs that are
    rewritten whole (an interrupted data set). Only a folder ``claim`` accepts is ever emptied."""
    folder = claim(folder, what, option, legacy)
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return folder
