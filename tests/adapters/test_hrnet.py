"""HRNet quirks (the contract test covers its autograd comparison): the feature head has no final_layer."""

from __future__ import annotations

import timm
from helpers.adapters import assert_refused


def test_feature_head_is_refused() -> None:
    assert_refused(timm.create_model("hrnet_w18_small", head="incre"), "final_layer is missing", size=64)
