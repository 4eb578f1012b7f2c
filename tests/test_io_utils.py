"""Atomic directory writes: what sits at the target (a symlink, a file) is replaced cleanly, a
directory published without replacing refuses an existing one, and a killed writer's temporary
is told from a live one's."""

import os
import signal
import subprocess
import sys

import pytest

from tfx_xmatch.io_utils import (
    atomic_directory, locked_temporary_directory, remove_abandoned_temporaries, rename_no_replace,
)


def _entries(directory) -> list[str]:
    return sorted(entry.name + ("@" if entry.is_symlink() else "") for entry in directory.iterdir())


@pytest.mark.parametrize("kind", ["symlink", "file", "dangling symlink"])
def test_atomic_directory_replaces_a_symlink_or_a_file_and_leaves_nothing_behind(tmp_path, kind):
    """rmtree refuses a symlink or a file, and ignore_errors hid it: the moved-aside .model.old
    stayed, and every later replace failed with NotADirectoryError."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    if kind == "file":
        (tmp_path / "model").write_text("a file")
    else:
        os.symlink(tmp_path / ("real" if kind == "symlink" else "missing"), tmp_path / "model")
    for attempt in ("first", "second"):
        with atomic_directory(tmp_path / "model") as directory:
            (directory / "new.txt").write_text(attempt)
        assert _entries(tmp_path) == ["model", "real"], attempt
        assert (tmp_path / "model" / "new.txt").read_text() == attempt
    assert os.listdir(tmp_path / "real") == ["old.txt"]  # the link's target is not touched


def test_atomic_directory_without_replace_refuses_what_appeared_meanwhile(tmp_path):
    with pytest.raises(FileExistsError, match="model"):
        with atomic_directory(tmp_path / "model", replace=False) as directory:
            (directory / "new.txt").write_text("new")
            (tmp_path / "model").mkdir()  # another process published it meanwhile
            (tmp_path / "model" / "theirs.txt").write_text("theirs")
    assert _entries(tmp_path) == ["model"] and os.listdir(tmp_path / "model") == ["theirs.txt"]


@pytest.mark.parametrize("target", ["non-empty directory", "empty directory", "file", "symlink"])
def test_rename_no_replace_refuses_any_existing_target(tmp_path, target):
    """os.rename replaces an empty directory silently."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "ours").write_text("ours")
    existing = tmp_path / "1"
    if target == "file":
        existing.write_text("theirs")
    elif target == "symlink":
        os.symlink(tmp_path / "elsewhere", existing)
    else:
        existing.mkdir()
        if target == "non-empty directory":
            (existing / "theirs").write_text("theirs")
    with pytest.raises(FileExistsError, match=str(existing)):
        rename_no_replace(tmp_path / "new", existing)
    assert os.listdir(tmp_path / "new") == ["ours"]
    rename_no_replace(tmp_path / "new", tmp_path / "2")
    assert os.listdir(tmp_path / "2") == ["ours"]


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """An export killed with SIGKILL left its hidden temporary in the model base path forever;
    one that another process is still writing must stay."""
    script = ("import sys; from tfx_xmatch.io_utils import locked_temporary_directory\n"
              "with locked_temporary_directory(sys.argv[1]) as directory:\n"
              "    (directory / 'variables').mkdir(); print(directory.name, flush=True); sys.stdin.read()\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    killed = writer.stdout.readline().strip()
    with locked_temporary_directory(tmp_path) as live:
        assert remove_abandoned_temporaries(tmp_path) == []  # the writer is alive: its lock holds
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert remove_abandoned_temporaries(tmp_path) == [killed]
        assert _entries(tmp_path) == [live.name]
    (tmp_path / ".locked.0123.otherhost.tmp").mkdir()  # another host's: its lock is not visible here
    assert remove_abandoned_temporaries(tmp_path) == []


def test_a_file_system_without_locks_leaves_the_directory_unclaimed_and_closes_the_claim(tmp_path, monkeypatch,
                                                                                        caplog):
    """flock failing with ENOLCK (NFS without its lock manager) escaped with the claim file's
    descriptor open and the file left: every run on such a mount failed, where it ran before."""
    import errno
    import fcntl

    from tfx_xmatch.io_utils import CLAIM_FILE, claimed_directory

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with claimed_directory(tmp_path, "run directory"):
            (tmp_path / "written").write_text("the block ran")
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert sorted(os.listdir(tmp_path)) == ["written"] and CLAIM_FILE not in os.listdir(tmp_path)
    assert "is not claimed: its file system takes no locks (No locks available)" in caplog.text

    def failing(descriptor, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", failing)  # any other failure is raised, the file closed
    with pytest.raises(OSError, match="Bad file descriptor"):
        with claimed_directory(tmp_path, "run directory"):
            pytest.fail("the block ran unclaimed")
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_an_error_of_a_block_run_unclaimed_carries_no_claim_error_as_its_context(tmp_path, monkeypatch):
    """The read-only case yielded inside its `except`: every error of the block then showed the
    PermissionError as "During handling of the above exception, another exception occurred"."""
    from tfx_xmatch.io_utils import claimed_directory

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(KeyError) as raised:
        with claimed_directory(tmp_path):
            raise KeyError("the block's own error")
    assert raised.value.__context__ is None
