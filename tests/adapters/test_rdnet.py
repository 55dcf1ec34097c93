"""RDNet quirks (the contract test covers its autograd comparison): eSE gates and a norm before the pool."""

from __future__ import annotations

import pytest
from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_rdnet

REFUSALS = {
    "ese_gate": (lambda: tiny_rdnet("BlockESE"), "eSE gate"),
    "norm_before_pool": (lambda: tiny_rdnet(head_norm_first=True), "head_norm_first"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
