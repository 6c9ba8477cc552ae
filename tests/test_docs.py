"""The examples in the docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import streamcoke

MODULES = sorted(m.name for m in pkgutil.walk_packages(streamcoke.__path__, "streamcoke."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
