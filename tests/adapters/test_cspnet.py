"""CspNet: the last stage's conv_transition (csp / cs3 stages), a DarkStage's last bottleneck conv3 + act3, or
DarkNet's last DarkBlock conv2 (activation before the residual add: the shortcut is a constant pooled offset)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, images_and_labels, prepare
from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg

import flatscan
from flatscan import scanner
from flatscan.contract import Tap


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


@pytest.mark.parametrize("act_layer", ["leaky_relu", "silu"])
def test_darknet_matches_autograd(act_layer: str) -> None:
    # DarkNet53: the last DarkBlock's conv2 -> BatchNorm -> activation, then + shortcut and nothing after it. The
    # pooled vector is mean(act(v)) + mean(shortcut): the shortcut is a constant shift of h, read at the block's input.
    model = tiny_cspnet(act_layer=act_layer, stage_type="dark", block_type="dark")
    head = assert_matches_autograd(model, "cspnet", size=32)
    assert head.feature_layer == "stages.1.blocks.1.conv2.conv"
    assert head.pooled_offset == Tap("stages.1.blocks.1", "input")
    assert head.to_dict()["pooled_offset"] == "input of stages.1.blocks.1"


def test_darknet_without_its_offset_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same head without the shortcut's mean does not reproduce the pooled vector: check_normalisation refuses.
    model = prepare(tiny_cspnet(stage_type="dark", block_type="dark"))
    head = replace(flatscan.describe(model), pooled_offset=None)
    monkeypatch.setattr(scanner, "describe", lambda _: head)
    with pytest.raises(flatscan.UnsupportedModel, match="is not the average"):
        flatscan.scan(model, [images_and_labels(size=32)], device="cpu")


REFUSALS = {
    "max_pool": (lambda: tiny_cspnet(global_pool="max"), "not a global average"),
    "tanh_activation": (lambda: tiny_cspnet(act_layer="tanh"), "without closed-form derivatives"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
