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


# Seconds each test file took on the 2-core machine (`--durations=0` summed per file, two
# workers, session 47), for files of 10 s or more. scripts/test.sh hands whole files to two
# workers in collection order (--no-loadscope-reorder); taking the longest first lets the short
# ones even out the ends (a simulation of xdist's scheduler on these times ends the two workers
# within 10 s of each other). xdist's own order, by number of tests, left the distributed-training
# file (8 tests, one of the longest) for last.
FILE_SECONDS = {
    "test_api_contracts.py": 206, "test_training.py": 143, "test_distributed_training.py": 131,
    "test_serving.py": 118, "test_benchmark_scripts.py": 114, "test_cli.py": 88, "test_tfx_trainer.py": 81,
    "test_beam_prepare.py": 80, "test_export.py": 76, "test_t2diff.py": 70, "test_sparcode.py": 65,
    "test_sparc.py": 60, "test_index.py": 55, "test_bench.py": 53, "test_pipeline_run.py": 49,
    "test_subclassing.py": 46, "test_beam_evaluate.py": 42, "test_beam_build_index.py": 32,
    "test_data_tfrecord.py": 30, "test_model_manager.py": 26, "test_two_tower.py": 22, "test_package.py": 13,
}


def pytest_collection_modifyitems(items):
    # Stable: a file's tests keep their own order; files not listed (short ones) go last.
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
