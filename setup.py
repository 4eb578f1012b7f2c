"""tfx_xmatch: cross-interaction retrieval models for TensorFlow Recommenders."""

from glob import glob

from setuptools import find_packages, setup

# The stack is pinned as a set: ScaNN 1.4.2's TF ops are compiled against TF 2.20 only, and
# TFRS 0.7.7 needs Keras 2 (tf-keras). See DESIGN.md ("Stack").
INSTALL_REQUIRES = [
    "tensorflow~=2.20.0",
    "tf-keras~=2.20.0",
    "tensorflow-recommenders==0.7.7",
    "scann==1.4.2",
    "tensorflow-serving-api~=2.20.0",
    "tensorflow-datasets>=4.9,<5",
    # tensorflow-datasets 4.9 imports it without declaring it; without it TFDS fails to load.
    "importlib_resources>=6",
    "numpy>=1.26,<3",
    "pyyaml>=6,<7",
    # Paired t-tests of model differences (tfx_xmatch.evaluation.significance).
    "scipy>=1.11,<2",
    "matplotlib>=3.8,<4",
]

setup(
    name="tfx_xmatch",
    version="0.1.0",
    description="Cross-interaction retrieval (SparCode, SPARC, T2Diff) on TensorFlow Recommenders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["tfx_xmatch", "tfx_xmatch.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The Beam pipelines (tfx_xmatch.pipelines); [gcp] adds the Dataflow runner and GCS.
        "beam": ["apache-beam[gcp]>=2.60,<3"],
        # Tests run every Beam pipeline on the DirectRunner, which plain apache-beam has;
        # pytest-xdist runs the test files on two processes.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.8,<4", "apache-beam>=2.60,<3"],
    },
    entry_points={"console_scripts": ["xmatch=tfx_xmatch.cli:main"]},
    # The tuned configs the README names, for an install without the checkout: they land in
    # <prefix>/share/tfx_xmatch/configs, which a missing --config file's error points to.
    data_files=[("share/tfx_xmatch/configs", sorted(glob("configs/*.yaml")))],
)
