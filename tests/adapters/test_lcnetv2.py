"""LCNetV2 quirks (the contract test covers its autograd comparison): a model without conv_head."""

from __future__ import annotations

from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_lcnetv2


def test_no_head_conv_is_refused() -> None:
    assert_refused(tiny_lcnetv2(head_hidden_size=None), "conv_head is missing")
