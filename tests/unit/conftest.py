"""Fixtures shared by the unit tests."""

import pytest

from tests.sglang_standin import StandIn


@pytest.fixture
def standin_factory():
    """make(**kwargs) -> (stand-in SGLang server, its URL); every server made is stopped afterwards."""
    made = []

    def make(**kwargs):
        standin = StandIn(**kwargs)
        made.append(standin)
        return standin, standin.start()

    yield make
    for standin in made:
        standin.stop()
