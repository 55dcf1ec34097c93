"""CspNet: the last stage's conv_transition (csp / cs3 stages), or a DarkStage's last bottleneck conv3 + act3."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg


def tiny_cspnet(global_pool: str = "avg", act_layer: str = "leaky_relu", **stages: object) -> CspNet:
    """Two stages of widths 8 and 16 (two blocks in the last); ``stages`` override the CspStagesCfg."""
    stage_cfg = {"depth": (1, 2), "out_chs": (8, 16), "stride": 2, "bottle_ratio": 0.5, **stages}
    cfg = CspModelCfg(
        stem=CspStemCfg(out_chs=8, kernel_size=3, stride=2, pool=""),
        stages=CspStagesCfg(**stage_cfg),  # type: ignore[arg-type]
        act_layer=act_layer,
    )
    return CspNet(cfg, num_classes=CLASSES, global_pool=global_pool, zero_init_last=False)


MODELS = {
    # CSPResNet: CrossStage, bottleneck blocks, cross_linear, conv_transition with leaky ReLU.
    "cspresnet": ({"expand_ratio": 2.0, "cross_linear": True}, "leaky_relu", "stages.1.conv_transition.conv"),
    # CSPDarkNet: CrossStage of dark blocks.
    "cspdarknet": (
        {"block_type": "dark", "down_growth": True, "bottle_ratio": 1.0, "block_ratio": 0.5},
        "leaky_relu",
        "stages.1.conv_transition.conv",
    ),
    # CS3DarkNet / CS3EdgeNet (SiLU; SE inside the blocks, before conv_transition).
    "cs3darknet": (
        {"stage_type": "cs3", "block_type": "dark", "bottle_ratio": 1.0, "block_ratio": 0.5, "attn_layer": "se"},
        "silu",
        "stages.1.conv_transition.conv",
    ),
    "cs3edgenet": (
        {"stage_type": "cs3", "block_type": "edge", "bottle_ratio": 1.0, "block_ratio": 0.5},
        "silu",
        "stages.1.conv_transition.conv",
    ),
    # DarkStage of bottleneck blocks: conv3 + bn, + shortcut, act3.
    "dark_stage_bottleneck": ({"stage_type": "dark", "bottle_ratio": 0.25}, "silu", "stages.1.blocks.1.conv3.conv"),
}


@pytest.mark.parametrize("name", MODELS)
def test_cspnet_matches_autograd(name: str) -> None:
    stages, act_layer, feature_layer = MODELS[name]
    head = assert_matches_autograd(tiny_cspnet(act_layer=act_layer, **stages), "cspnet", size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == act_layer


REFUSALS = {
    # DarkNet53: the last DarkBlock activates before its residual add and nothing after it.
    "darknet": (lambda: tiny_cspnet(stage_type="dark", block_type="dark"), "before the residual add"),
    "max_pool": (lambda: tiny_cspnet(global_pool="max"), "not a global average"),
    "tanh_activation": (lambda: tiny_cspnet(act_layer="tanh"), "without closed-form derivatives"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
