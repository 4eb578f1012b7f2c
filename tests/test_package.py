"""The package's Keras-2 guard, checked in fresh interpreters (import order is global state), and its setup script."""

import os
import subprocess
import sys


def _run(code):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_tfx_xmatch_first_selects_keras_2():
    result = _run("import tfx_xmatch, tensorflow as tf; print(tf.keras.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras")


def test_a_bare_tensorflow_import_before_tfx_xmatch_is_fine():
    # tf.keras resolves lazily, so importing TensorFlow first must not force Keras 3.
    result = _run("import tensorflow as tf; import tfx_xmatch; print(tf.keras.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras")


def test_tensorflow_already_imported_with_keras_3_is_refused_with_a_clear_message():
    result = _run("import tensorflow as tf; tf.keras.layers; import tfx_xmatch")
    assert result.returncode != 0
    assert "tfx_xmatch needs tf.keras to be Keras 2" in result.stderr
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr


def test_setup_sh_refuses_a_missing_or_unsupported_python_before_making_a_venv(tmp_path):
    """A Python 3.9 made a .venv that pip then refused, and every later run reused it; with no
    Python on PATH the script exited 1 printing nothing."""
    import shutil
    import stat
    import subprocess

    from tests.conftest import REPO_ROOT

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname", "rm"):
        (tools / tool).symlink_to(shutil.which(tool))
    old_python = tools / "python3"  # answers as a Python 3.9 would
    old_python.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.9.18;; *) exit 1;; esac\n')
    old_python.chmod(old_python.stat().st_mode | stat.S_IEXEC)

    def setup(path_dirs):
        return subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={"PATH": ":".join(str(d) for d in path_dirs), "HOME": str(tmp_path)})

    done = setup([tools])
    assert done.returncode == 1 and "is Python 3.9.18; tfx_xmatch needs 3.10-3.12" in done.stderr, done.stderr
    old_python.unlink()
    done = setup([tools])
    assert done.returncode == 1 and "no python3.11 or python3 on PATH" in done.stderr, done.stderr
    assert not (tmp_path / ".venv").exists()
