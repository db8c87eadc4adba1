"""File helpers every layer of localgp may import (it imports nothing of localgp but its errors)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from localgp.errors import DamagedFile


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """write(tmp) into a temporary file beside `path`, then renamed over it: a reader sees the old
    file or the new one, never half of one, and a failed write leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # one a killed process of the same pid left: write() may append
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: str | Path) -> None:
    """The temporary files of `path` (replace_atomically's) that a killed process left behind: the
    ones whose process is gone, never a live writer's (another run writing the same file now)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = re.fullmatch(rf"\.{re.escape(path.name)}\.tmp(\d+)", leftover.name)
        if pid is None:
            continue
        try:
            os.kill(int(pid.group(1)), 0)
        except ProcessLookupError:  # gone
            leftover.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """An exclusive lock on `directory` (flock on the directory itself: nothing is written there)
    for as long as the block runs: processes writing there one at a time."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomically(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path, fix: str, expect: type = dict):
    """The JSON value of a file localgp wrote (a dict unless `expect` says otherwise); anything
    else there (cut short, zeroed, not UTF-8, another file's bytes, a directory) raises
    DamagedFile naming the file and `fix`, what recreates it."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise DamagedFile(path, "a directory where a file should be", fix) from None
    except (UnicodeDecodeError, ValueError) as err:
        why = "empty" if path.stat().st_size == 0 else f"not valid JSON: {err}"
        raise DamagedFile(path, why, fix) from err
    if not isinstance(value, expect):
        raise DamagedFile(path, f"a JSON {type(value).__name__}, expected a {expect.__name__}", fix)
    return value
