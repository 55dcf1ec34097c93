"""LowFormer quirks (the contract test covers its autograd comparison): a model without its head conv."""

from __future__ import annotations

from helpers.adapters import CLASSES, assert_refused
from helpers.tiny_models import tiny_lowformer


def test_no_head_conv_is_refused() -> None:
    model = tiny_lowformer()
    model.reset_classifier(CLASSES, reset_other=True)
    assert_refused(model, "in_conv was removed")
