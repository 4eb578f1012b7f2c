"""Atomic file and directory writes, and claims on output directories: a reader never sees a
half-written output, and two processes never write one directory at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import tempfile
import uuid
from typing import Iterable, Iterator, Optional

log = logging.getLogger(__name__)


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file system of TensorFlow's (gs://, hdfs://, ram://...), to be
    read through tf.io.gfile, rather than a local path."""
    return "://" in os.fspath(path)


def absolute_unless_url(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL as it is (os.path.abspath and pathlib turn "gs://b/x"
    into the local "<cwd>/gs:/b/x")."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
    with _temporary_beside(pathlib.Path(path)) as (temporary, path):
        yield temporary
        _publish(temporary, path)


@contextlib.contextmanager
def atomic_paths(paths: Iterable[str | os.PathLike]) -> Iterator[list[pathlib.Path]]:
    """Like :func:`atomic_path` for files that belong together: one temporary per path.

    Nothing is renamed until the block has written them all, so a failure (a bad record in
    the last shard) leaves every old file as it was instead of a mix of new and old; the
    renames follow each other at once, the only window in which a kill mixes them.
    """
    with contextlib.ExitStack() as stack:
        entered = [stack.enter_context(_temporary_beside(pathlib.Path(path))) for path in paths]
        yield [temporary for temporary, _ in entered]
        for temporary, path in entered:
            _publish(temporary, path)


@contextlib.contextmanager
def _temporary_beside(path: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = pathlib.Path(temporary)
    try:
        yield temporary, path
    finally:
        temporary.unlink(missing_ok=True)


def _publish(temporary: pathlib.Path, path: pathlib.Path) -> None:
    # mkstemp creates 0600 files; outputs should get the usual umask-based mode so that,
    # e.g., a model server running as another user can read them.
    if temporary.exists():
        os.chmod(temporary, 0o666 & ~_UMASK)
    os.replace(temporary, path)


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Read once at import: os.umask can only be read by setting it, which is not thread-safe
# while TensorFlow threads create files.
_UMASK = _read_umask()


def _json_safe(value):
    """NaN and infinities become None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_texts_atomic(texts: dict[str | os.PathLike, str]) -> None:
    """Writes ``{path: text}`` as :func:`atomic_paths` does: no file replaced before all are
    written (a JSON result and the page made from it stay a pair)."""
    with atomic_paths(list(texts)) as temporaries:
        for temporary, text in zip(temporaries, texts.values()):
            temporary.write_text(text, encoding="utf-8")


def json_text(value) -> str:
    """The text every JSON output here is written as: strict JSON, indented, newline-terminated."""
    return json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, value) -> None:
    write_text_atomic(path, json_text(value))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[pathlib.Path]:
    """Yields an empty temporary directory that replaces ``path`` when the block succeeds.

    An existing ``path`` (a directory, or a file or symlink, which is replaced itself, not what
    it points to) is moved aside first and deleted only after the new one is in place, so a
    crash leaves the old or the new directory (the old one possibly under ``.NAME.old``), never
    a mix; between the two renames ``path`` is briefly absent. The next call for the same
    ``path`` restores such a ``.NAME.old`` first (:func:`restore_moved_aside`).

    Args:
      replace: Whether an existing ``path`` is replaced. With False the new directory is
        renamed into place only if nothing is there by then (:func:`rename_no_replace`), else
        FileExistsError: a ``path`` another process created meanwhile is never replaced.
    """
    path = pathlib.Path(path)
    restore_moved_aside(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp's 0700 would survive the rename and lock out other users.
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    temporary.mkdir()
    try:
        yield temporary
        if not replace:
            rename_no_replace(temporary, path)
            return
        previous = path.with_name(f".{path.name}.old")
        # lexists: a dangling symlink at path is replaced too (os.replace refuses to put a
        # directory over any non-directory).
        if os.path.lexists(path):
            remove_entry(previous)
            os.replace(path, previous)
        os.replace(temporary, path)
        remove_entry(previous)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def rename_no_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames the directory ``source`` to ``target`` unless ``target`` exists (FileExistsError
    naming it): for outputs that must never be replaced, such as a published model version.

    POSIX rename refuses a non-empty directory (ENOTEMPTY) or a file (ENOTDIR) as the target,
    so a directory another process published between the check and the rename stays as it
    is; only an empty directory appearing in that instant would be replaced, losing nothing.
    """
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    try:
        os.rename(source, target)
    except OSError as error:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "already exists", str(target)) from error
        raise


def remove_entry(path: str | os.PathLike) -> None:
    """Removes ``path`` whatever it is (a directory tree, a file, a symlink: not what it points
    to) if it exists. shutil.rmtree refuses symlinks and files, and ignore_errors hid that."""
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def restore_moved_aside(path: str | os.PathLike) -> bool:
    """Renames ``.NAME.old`` back to a missing ``path``: the only copy left by a process killed
    between :func:`atomic_directory`'s two renames. Returns whether it did."""
    path = pathlib.Path(path)
    previous = path.with_name(f".{path.name}.old")
    if os.path.lexists(path) or not os.path.lexists(previous):
        return False
    os.replace(previous, path)
    return True


@contextlib.contextmanager
def locked_temporary_directory(parent: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a new hidden directory in ``parent`` that this process holds a lock on (``flock``)
    until the block ends; removed then unless the block renamed it away (published it).

    The lock is what lets :func:`remove_abandoned_temporaries` tell one left by a killed
    process (the kernel drops a dead process's locks, even after SIGKILL) from one another
    process is still filling; a process id would not (reused, or another PID namespace).
    """
    parent = pathlib.Path(parent)
    pending = parent / f".pending.{uuid.uuid4().hex}.tmp"
    pending.mkdir()  # mkdir, not mkdtemp: mkdtemp's 0700 would survive a rename into place
    descriptor = os.open(pending, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        # Renamed to the name a cleaner looks for only once locked: never seen unlocked alive.
        temporary = parent / f"{_LOCKED_PREFIX}{uuid.uuid4().hex}.{socket.gethostname()}.tmp"
        os.rename(pending, temporary)
        try:
            yield temporary
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    finally:
        os.close(descriptor)
        shutil.rmtree(pending, ignore_errors=True)


_LOCKED_PREFIX = ".locked."


def remove_abandoned_temporaries(parent: str | os.PathLike) -> list[str]:
    """Removes the :func:`locked_temporary_directory` directories in ``parent`` whose process
    died: created on this host (a network file system may not share locks between hosts) and
    not locked any more. One another process is still writing stays. Returns the names."""
    removed = []
    suffix = f".{socket.gethostname()}.tmp"
    for entry in pathlib.Path(parent).iterdir():
        if not (entry.name.startswith(_LOCKED_PREFIX) and entry.name.endswith(suffix)) or entry.is_symlink():
            continue
        try:
            descriptor = os.open(entry, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        finally:
            os.close(descriptor)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def temporary_of(name: str, outputs: Iterable[str]) -> Optional[str]:
    """The output among ``outputs`` that ``name`` is an ``atomic_path`` / ``atomic_directory``
    temporary (``.NAME.<random>.tmp``) or moved-aside copy (``.NAME.old``) of, else None."""
    for output in outputs:
        if name == f".{output}.old" or (name.startswith(f".{output}.") and name.endswith(".tmp")
                                         and len(name) > len(output) + len("..tmp")):
            return output
    return None


def remove_stale_temporaries(directory: str | os.PathLike, outputs: Iterable[str]) -> list[str]:
    """Cleans up after atomic writes into ``directory`` that a killed process left unfinished.

    Only the temporaries of ``outputs`` (the names the caller writes there) are touched, so a
    user's own ``.cache.tmp`` beside them survives: ``.NAME.*.tmp`` temporaries (files or
    directories) are removed, and so are ``.NAME.old`` copies whose ``NAME`` is in place; a
    ``.NAME.old`` without ``NAME`` is the only copy left (the process died between
    ``atomic_directory``'s two renames) and is renamed back to ``NAME``. Call it only when no
    other process writes into ``directory``.

    Returns:
      The names removed or restored, for logging.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    outputs = tuple(outputs)
    changed = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        output = temporary_of(name, outputs)
        if output is None:
            continue
        original = directory / output
        if name.endswith(".old") and not os.path.lexists(original):
            os.replace(entry, original)
        else:
            remove_entry(entry)
        changed.append(name)
    return changed


def copy_directory(local: str | os.PathLike, target: str, last: Optional[str] = None) -> None:
    """Copies a local directory tree to ``target``, any ``tf.io.gfile`` path (``gs://``...).

    Args:
      local: The directory to copy.
      target: Where its contents go (created if missing).
      last: A top-level file name copied after everything else, e.g. the file a reader takes
        as the sign that the rest is there.
    """
    import tensorflow as tf

    local = str(local)
    deferred = []
    for directory, _, files in os.walk(local):
        relative = os.path.relpath(directory, local)
        destination = target.rstrip("/") if relative == "." else f"{target.rstrip('/')}/{relative}"
        tf.io.gfile.makedirs(destination)
        for name in files:
            pair = (os.path.join(directory, name), f"{destination}/{name}")
            if relative == "." and name == last:
                deferred.append(pair)
            else:
                tf.io.gfile.copy(*pair, overwrite=True)
    for source, destination in deferred:
        tf.io.gfile.copy(source, destination, overwrite=True)


def copy_directory_or_nothing(local: str | os.PathLike, target: str, last: Optional[str] = None) -> None:
    """:func:`copy_directory` to a ``target`` that does not exist yet, removed again if the copy
    fails (an object store has no atomic rename): a failed copy leaves nothing half-written."""
    import tensorflow as tf

    try:
        copy_directory(local, target, last)
    except BaseException:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.rmtree(target)
        raise


# The file whose lock says a process is writing the directory it is in (see claimed_directory).
CLAIM_FILE = ".xmatch-writing.lock"


class DirectoryBeingWritten(RuntimeError):
    """Another process is writing the directory this one was given."""


@contextlib.contextmanager
def claimed_directory(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Claims the existing ``directory`` for this process while the block writes it: a second
    process given the same directory fails at once instead of mixing its files with this one's
    (two trainings each left some of config.json, model/ and metrics.json, and both exited 0).

    The claim is an exclusive ``flock`` on ``CLAIM_FILE`` in the directory. The kernel drops it
    when its process dies, so a killed writer blocks nobody (its file is taken over, unlocked,
    by the next); the file is removed when the block ends. Not claimed: a URL (``gs://``...;
    object stores have no locks, so keep two writers of one apart yourself), a directory this
    process may not create files in (a finished run on a read-only mount is still read), and one
    on a file system that takes no locks (NFS without its lock manager; a warning says so).

    Raises:
      DirectoryBeingWritten: Another process holds the claim; the message names the directory
        and that process.
    """
    if "://" in os.fspath(directory):
        yield
        return
    path = pathlib.Path(directory) / CLAIM_FILE
    descriptor = _locked_claim_file(path, directory, what)
    if descriptor is None:
        yield
        return
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))  # for the message of a process refused
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: see _locked_claim_file
        os.close(descriptor)


# The claim file cannot be made (a finished run on a read-only mount is still read), or the file
# system takes no locks (NFS without its lock manager): the directory goes unclaimed.
_CANNOT_CREATE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


def _locked_claim_file(path: pathlib.Path, directory, what: str) -> Optional[int]:
    """The descriptor of ``path``, created if need be and locked by this process; None when the
    directory cannot be claimed (``_CANNOT_CREATE``, ``_NO_LOCKS``).

    Raises:
      DirectoryBeingWritten: Another process holds the lock.
    """
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            if error.errno in _CANNOT_CREATE:
                return None
            raise
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _claim_holder(descriptor)
            os.close(descriptor)
            raise DirectoryBeingWritten(
                f"{what} {str(directory)!r} is being written by another process"
                f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to end, or give another "
                "directory") from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _NO_LOCKS:
                raise
            with contextlib.suppress(OSError):
                path.unlink()  # nobody can hold a lock on it
            log.warning("%s %s is not claimed: its file system takes no locks (%s); keep other processes from "
                        "writing it meanwhile", what, directory, error.strerror)
            return None
        # The holder removes the file as it releases it: a lock taken on the removed file
        # claims nothing, so take the one now in its place.
        if _is_same_file(descriptor, path):
            return descriptor
        os.close(descriptor)


def _claim_holder(descriptor: int) -> str:
    """The process id the claim's holder wrote, "" if it cannot be read."""
    try:
        return os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _is_same_file(descriptor: int, path: pathlib.Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def check_checkpoint_directory(directory: str | os.PathLike, what: str) -> None:
    """Refuses a directory for checkpoints whose path holds a glob character (``[``, ``*``,
    ``?``): TensorFlow finds a checkpoint by matching its path as a pattern, so the weights a
    run saved in ``exp[1]/`` were never found again ("Failed to find any matching files"), after
    the first epoch or at the end of a pipeline.

    Raises:
      ValueError: Naming the directory.
    """
    text = os.fspath(directory)
    absolute = absolute_unless_url(text)
    if any(character in absolute for character in "[*?"):
        raise ValueError(f"{what} {text!r}: its path {absolute!r} holds [, * or ?, which TensorFlow reads as a "
                         "pattern where it looks for the checkpoints saved there, so they could not be read back; "
                         "choose a path without them")


def check_output_location(path: str | os.PathLike, flag: str, *, directory: bool) -> None:
    """Refuses, before any work is done, a local output ``path`` (given as ``flag``) that could
    not be written: a dangling symlink, a file where a directory goes or the reverse, a file on
    the way to it, or a nearest existing directory that is read-only or not this user's to write.
    The work it would otherwise have done first (an evaluation, five pipeline stages) was lost.
    A URL is left to the write itself.

    Raises:
      FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError: naming ``path``.
    """
    text = os.fspath(path)
    if "://" in text:
        return
    path = pathlib.Path(text).absolute()
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{flag} {text!r} is a dangling symlink (to {os.readlink(path)!r}, which does "
                                "not exist)")
    if path.exists() and path.is_dir() != directory:
        raise (IsADirectoryError(f"{flag} {text!r} is a directory; give a file path") if path.is_dir()
               else NotADirectoryError(f"{flag} {text!r} is a file, not a directory"))
    # Where the output's first new entry would be made (its parent, for a file).
    nearest = next(parent for parent in (path if directory else path.parent, *path.parents) if parent.exists())
    if not nearest.is_dir():
        raise NotADirectoryError(f"{flag} {text!r}: {str(nearest)!r} is a file, not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {text!r} cannot be written: {str(nearest)!r} is read-only or not "
                              "writable by this user")


# Model versions are directories named by an int64, as TF Serving reads them.
INT64_MAX = 2**63 - 1


def version_number(name: str) -> int | None:
    """The version a directory called ``name`` holds, None if it is no version: ASCII digits
    within int64, as TF Serving's safe_strto64 (the exporter numbers versions by this rule too).

    "²" passed isdigit() and failed int() in every poll; 99999999999999999999 loaded and failed
    every response.
    """
    if not (name.isascii() and name.isdigit()) or int(name) > INT64_MAX:
        return None
    return int(name)
