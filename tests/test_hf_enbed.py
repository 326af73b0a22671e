"""HF conversion of the `enbed` family: the shared tests in tests/hf_family_tests.py on its 2-rank checkpoints."""

import pytest

from hf_family_tests import *  # noqa: F401,F403  (the tests and fixtures, collected here for this family)


@pytest.fixture(scope="module")
def recipe():
    return "enbed"
