"""Durable files: the sha256 of a file, fsync of files and folders, atomic text files, and output
folders that replace an earlier one without ever deleting a user's files.

One place for what the model cache, checkpoints, prepared data, exports and the run directory's
JSON files need to write files that survive a crash and to recognise a damaged one (a file written
through AtomicTextFile or write_text_atomic is either the old one or the whole new one, never half),
and for the one decision of whether an output folder may be replaced (check_output_dir) and the
swap that replaces it (replace_dir); and one writer per run folder (hold_dir_lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_HELD_LOCKS: dict[Path, int] = {}  # folders this process holds the lock of -> the open folder's fd
LENT_LOCK_ENV = "TUNELAB_LENT_LOCK"  # a folder whose lock the parent process holds for this one (lend_dir_lock)


class FolderBusy(OSError):
    """Another process holds the folder's lock."""


def hold_dir_lock(folder: Path) -> None:
    """Take an exclusive lock on `folder` itself (flock on the folder, so no file is added to it) and hold
    it until this process exits; FolderBusy at once when another process holds it. Taken again in the
    same process, it is already held (a pipeline's stages share it); in a child the holder started with
    lend_dir_lock's environment, too."""
    import fcntl

    key = folder.resolve()
    if key in _HELD_LOCKS or os.environ.get(LENT_LOCK_ENV) == str(key):
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{folder}: another process is writing it") from None
    _HELD_LOCKS[key] = fd


def lend_dir_lock(folder: Path) -> dict[str, str]:
    """The environment for child processes that write `folder` while this process holds its lock and waits
    for them (tunelab run --nproc: the training stage under torchrun)."""
    key = folder.resolve()
    if key not in _HELD_LOCKS:
        raise RuntimeError(f"{folder}: lend_dir_lock needs the lock held by this process")
    return {**os.environ, LENT_LOCK_ENV: str(key)}


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


# ----------------------------------------------------------------------------------------------
# output folders that replace an earlier one


_MAX_MANIFEST_BYTES = 1 << 20  # an export.json lists a handful of files


def _protected(folder: Path, reads: list[Path]) -> str | None:
    """Why `folder` (resolved) must never be replaced, or None."""
    cwd = Path.cwd().resolve()
    if folder == Path(folder.anchor):
        return "it is the root of the file system"
    if folder == Path.home().resolve():
        return "it is your home folder"
    if folder == cwd:
        return "it is the current folder"
    if folder in cwd.parents:
        return "it holds the current folder"
    for read in reads:
        if folder == read or folder in read.parents or read in folder.parents:
            return f"it is, holds or lies inside {read}, which this command reads"
    return None


def foreign_entries(folder: Path, manifest: str) -> list[str]:
    """Entries of `folder` that tunelab did not write: everything except `manifest` (a JSON file
    whose "files" names what tunelab wrote) and the plain files it names."""
    written: set[str] = set()
    try:
        if (folder / manifest).stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError("too large to be a manifest tunelab wrote")
        listed = json.loads((folder / manifest).read_text(encoding="utf-8")).get("files", {})
        written = {manifest, *(name for name in listed if isinstance(name, str))}
    except (OSError, ValueError, AttributeError, RecursionError):  # not a manifest tunelab wrote
        pass
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name not in written or entry.is_symlink() or not entry.is_file())


def check_output_dir(out_dir: Path, *, reads: list[Path], manifest: str, force: bool, option: str = "--out") -> None:
    """Refuse an output folder whose replacement could lose a user's files.

    Never replaced, whatever `force` says: the root, the home folder, the current folder or one
    holding it, a folder that is, holds or lies inside one of `reads`, a symbolic link, and a folder
    with anything tunelab did not write (named in the error: the user deletes it, not tunelab).
    A folder holding only an earlier output (the files its `manifest` lists) is replaced with `force`.
    """
    from tunelab.errors import ConfigError

    if out_dir.is_symlink():
        raise ConfigError(f"{option} {out_dir}: is a symbolic link; give the folder itself (tunelab replaces "
                          "output folders whole and never follows a link to do so)")
    resolved = out_dir.resolve()
    reason = _protected(resolved, [Path(r).resolve() for r in reads])
    if reason:
        raise ConfigError(f"{option} {out_dir}: refused because {reason}; choose a new folder")
    if not resolved.exists():
        ancestor = resolved.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{option} {out_dir}: {ancestor} is a file, not a folder")
        return
    if not resolved.is_dir():
        raise ConfigError(f"{option} {out_dir}: exists and is not a folder")
    foreign = foreign_entries(resolved, manifest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{option} {out_dir}: holds files tunelab did not write ({shown}); nothing is deleted "
                          "for you: choose a new folder, or remove them yourself")
    if any(resolved.iterdir()) and not force:
        raise ConfigError(f"{option} {out_dir}: holds an earlier tunelab output ({manifest}); "
                          "pass --force to replace it")


def _fresh_sibling(final: Path, kind: str) -> Path:
    """A new empty folder beside `final`, never one that existed (mkdir fails rather than reuse it),
    with the permissions of the umask (tempfile.mkdtemp would make it private to the user)."""
    while True:
        folder = final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def replace_dir(build: Callable[[Path], None], final: Path) -> None:
    """Build a folder in a fresh temporary sibling of `final`, then swap it in: the old one moves
    aside first and is deleted only once the new one is in place, so a failure at any point leaves
    either the old folder or the new one, never half of one. Callers check `final` first
    (check_output_dir): this replaces whatever is there."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(final, "new")
    try:
        build(tmp)
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = _fresh_sibling(final, "old")
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old / final.name, final)
            raise
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
