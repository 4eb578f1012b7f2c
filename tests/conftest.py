"""Shared fixtures: where the real datasets live, and a quiet TensorFlow."""

import os
import pathlib

import pytest

import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    """``$XMATCH_DATA_DIR`` if set, else ``../shared/data`` beside the repository."""
    return pathlib.Path(os.environ.get("XMATCH_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def real_data_dir():
    """Directory of the real datasets; the test is skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path} (set XMATCH_DATA_DIR)")
    return path
