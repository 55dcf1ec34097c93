"""EfficientViM (and its distilled variant) is refused: LayerNorm2d before the pool, multi-branch state-space head."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_refused
from timm.models.efficientvim import EfficientViM, EfficientViMDistilled


@pytest.mark.parametrize("model_class", [EfficientViM, EfficientViMDistilled])
def test_efficientvim_is_refused(model_class: type[EfficientViM]) -> None:
    model = model_class(num_classes=CLASSES, embed_dim=(8, 8, 8), depths=(1, 1, 1), state_dim=(4, 4, 4))
    assert_refused(model, "LayerNorm2d .* before the pool", size=64)
