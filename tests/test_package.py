"""The package's Keras-2 guard, checked in fresh interpreters (import order is global state)."""

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
