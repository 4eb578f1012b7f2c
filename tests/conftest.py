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


# Seconds each test file took on the 2-core machine (`--durations=0`, session 37; the
# subclassing file alone, session 38), for files of 10 s or more. scripts/test.sh hands whole
# files to two workers in collection order (--no-loadscope-reorder); taking the longest first
# lets the short ones even out the ends.
# xdist's own order, by number of tests, left the 200-s distributed-training file (8 tests)
# for last: a simulation of its scheduler on these times ends one worker 170 s before the other.
FILE_SECONDS = {
    "test_api_contracts.py": 285, "test_training.py": 276, "test_benchmark_scripts.py": 130,
    "test_distributed_training.py": 203, "test_cli.py": 153, "test_tfx_trainer.py": 114,
    "test_t2diff.py": 110, "test_export.py": 86, "test_sparcode.py": 84, "test_sparc.py": 76,
    "test_beam_prepare.py": 68, "test_bench.py": 65, "test_index.py": 54, "test_serving.py": 46,
    "test_subclassing.py": 40, "test_pipeline_run.py": 37, "test_beam_build_index.py": 31,
    "test_beam_evaluate.py": 27, "test_data_tfrecord.py": 23, "test_two_tower.py": 21,
    "test_residual_quantizer.py": 20, "test_package.py": 13, "test_model_manager.py": 10,
}


def pytest_collection_modifyitems(items):
    # Stable: a file's tests keep their own order; files not listed (short ones) go last.
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
