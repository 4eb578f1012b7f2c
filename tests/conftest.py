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


# Test files by the time their tests took, longest first (`--durations=0`, 2 cores, session 36).
# scripts/test.sh hands whole files to two workers in collection order (--no-loadscope-reorder):
# taking the longest first lets the short files even out the ends, where xdist's own order (by
# number of tests) left a four-minute file for last and one worker idle meanwhile.
LONGEST_FIRST = (
    "test_training.py", "test_api_contracts.py", "test_distributed_training.py",
    "test_benchmark_scripts.py", "test_cli.py", "test_tfx_trainer.py", "test_beam_prepare.py",
    "test_export.py", "test_t2diff.py", "test_bench.py", "test_sparcode.py", "test_sparc.py",
    "test_serving.py", "test_pipeline_run.py", "test_beam_build_index.py", "test_index.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays
