"""Sequencer2d normalises every position across channels (LayerNorm) before the pool: refused."""

from __future__ import annotations

from helpers.adapters import CLASSES, assert_refused
from timm.models.sequencer import Sequencer2d


def test_sequencer_is_refused() -> None:
    model = Sequencer2d(
        num_classes=CLASSES,
        layers=(1, 1),
        patch_sizes=(4, 2),
        embed_dims=(8, 8),
        hidden_sizes=(4, 4),
        mlp_ratios=(1.0, 1.0),
    )
    assert_refused(model, "normalises the last stage's output across channels")
