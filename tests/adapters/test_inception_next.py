"""MetaNeXt (InceptionNeXt): last block's mlp.fc2, layer scale gamma, + shortcut; MlpClassifierHead."""

from __future__ import annotations

from functools import partial

from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.inception_next import InceptionDWConv2d, MetaNeXt


def tiny_metanext(**kwargs: object) -> MetaNeXt:
    mixer = partial(InceptionDWConv2d, band_kernel_size=5, branch_ratio=0.25)
    return MetaNeXt(
        num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), token_mixers=mixer, mlp_ratios=2, **kwargs
    )


def test_inception_next_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_metanext(), "inception_next", size=32)
    assert head.feature_layer == "stages.3.blocks.0.mlp.fc2"
    assert head.classifier == "head.fc2"
    assert head.head_type == "general"


def test_max_pool_is_refused() -> None:
    assert_refused(tiny_metanext(global_pool="max"), "not a global average")
