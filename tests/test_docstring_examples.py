"""Every ``Example:`` in the package's docstrings runs as written, with the names a reader of the
docs has at hand (``tf``, ``np`` and the public layers, indexes and models)."""

import doctest
import importlib
import pkgutil

import numpy as np
import pytest
import tensorflow as tf

import tfx_xmatch
import tfx_xmatch.index
import tfx_xmatch.layers
import tfx_xmatch.models

MODULES = sorted(info.name for info in pkgutil.walk_packages(tfx_xmatch.__path__, "tfx_xmatch.")
                 if not info.name.endswith("__main__"))  # a __main__ runs its command when imported


def _reader_names() -> dict:
    names = {"tf": tf, "np": np}
    for package in (tfx_xmatch.index, tfx_xmatch.layers, tfx_xmatch.models):
        names.update({name: getattr(package, name) for name in package.__all__})
    return names


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, extraglobs=_reader_names(), optionflags=doctest.ELLIPSIS, report=True)
    assert failures == 0, f"{failures} docstring example(s) of {name} failed (printed above)"


def test_the_examples_are_found():
    finder = doctest.DocTestFinder()
    examples = sum(len(test.examples) for name in MODULES for test in finder.find(importlib.import_module(name)))
    assert examples >= 70, examples
