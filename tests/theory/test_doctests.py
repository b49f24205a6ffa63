"""The examples in fastpred.theory's docstrings run and print what they claim."""

import doctest

import pytest

from fastpred.theory import analytic, decoupled


@pytest.mark.parametrize("module", [analytic, decoupled], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
