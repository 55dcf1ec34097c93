"""ConViT is refused: a vision transformer (class token, or LayerNorm on the tokens before the average pool)."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_refused
from timm.models.convit import ConVit


@pytest.mark.parametrize(("global_pool", "reason"), [("token", "class token"), ("avg", "LayerNorm.*before the pool")])
def test_convit_is_refused(global_pool: str, reason: str) -> None:
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 4, "num_heads": 2, "depth": 2, "local_up_to_layer": 1}
    model = ConVit(**tiny, num_classes=CLASSES, global_pool=global_pool)
    assert_refused(model, reason)
