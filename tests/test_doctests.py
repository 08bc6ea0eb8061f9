"""The docstring examples of the modules that carry them run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "kanoclip.modeling.maps",
    "kanoclip.modeling.prompts",
    "kanoclip.modeling.losses",
    "kanoclip.cache",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted >= 1, f"{name} has no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
