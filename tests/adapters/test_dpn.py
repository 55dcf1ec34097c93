"""DPN quirks (the contract test covers the '-b' layout): the plain layout and tanh are refused."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_dpn

REFUSALS = {
    # The plain layout's c1x1_c feeds pooled channels at both ends of the concatenation.
    "plain_layout": (partial(tiny_dpn, b=False), "not one contiguous block of channels"),
    "tanh": (partial(tiny_dpn, act_layer="tanh"), "without closed-form derivatives"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
