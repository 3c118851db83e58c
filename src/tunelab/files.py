"""Durable files: the sha256 of a file, fsync of files and folders, and atomic text files.

One place for what the model cache, checkpoints, prepared data, exports and the run directory's
JSON files need to write files that survive a crash and to recognise a damaged one. A file written
through AtomicTextFile or write_text_atomic is either the old one or the whole new one, never half.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicTextFile:
    """A UTF-8 text file written under a temporary name beside `path`, streamed with `write`, and
    renamed into place by `commit` (after an fsync); `abandon` removes the temporary file instead."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = self.tmp.open("w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.file.write(text)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (creating its folder): readers see the old file or the new one."""
    out = AtomicTextFile(path)
    try:
        out.write(text)
    except BaseException:
        out.abandon()
        raise
    out.commit()
