"""The worked examples in docstrings are executed, so they cannot go stale."""
import doctest

import pytest

import genieblue_jax.hf.tables
import genieblue_jax.models
import genieblue_jax.models.configs


@pytest.mark.parametrize("module", [genieblue_jax.models, genieblue_jax.models.configs,
                                    genieblue_jax.hf.tables])
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
