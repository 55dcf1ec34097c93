"""Tiny timm models of the families the contract test (tests/adapters/test_contract.py) covers, at float-cheap widths.

Shared by the contract table and the per-family quirk tests.
"""

from __future__ import annotations

from functools import partial

import timm
from timm.models.cspnext import CspNext
from timm.models.densenet import DenseNet
from timm.models.dpn import DPN
from timm.models.fasternet import FasterNet
from timm.models.hrnet import HighResolutionNet
from timm.models.inception_next import InceptionDWConv2d, MetaNeXt
from timm.models.lcnetv2 import LCNetV2
from timm.models.lowformer import LowFormer
from timm.models.nasnet import NASNetALarge
from timm.models.rdnet import RDNet
from timm.models.starnet import StarNet
from torch import nn

from helpers.adapters import CLASSES


def tiny_starnet(**kwargs: object) -> StarNet:
    return StarNet(num_classes=CLASSES, base_dim=2, depths=(1, 1), mlp_ratio=2, **kwargs)


def tiny_lcnetv2(**kwargs: object) -> LCNetV2:
    kwargs = {"num_classes": CLASSES, "scale": 0.1, "depths": (1, 1, 1, 1), "head_hidden_size": 16, **kwargs}
    return LCNetV2(**kwargs)


def tiny_metanext(**kwargs: object) -> MetaNeXt:
    mixer = partial(InceptionDWConv2d, band_kernel_size=5, branch_ratio=0.25)
    return MetaNeXt(
        num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), token_mixers=mixer, mlp_ratios=2, **kwargs
    )


def tiny_cspnext(**kwargs: object) -> CspNext:
    return CspNext(num_classes=CLASSES, depths=(1, 1, 1, 1), channels=(8, 8, 16, 16), **kwargs)


def tiny_fasternet(**kwargs: object) -> FasterNet:
    return FasterNet(num_classes=CLASSES, embed_dim=8, depths=(1, 1, 1, 1), feature_dim=24, **kwargs)


tiny_densenet = partial(DenseNet, growth_rate=4, block_config=(1, 2), bn_size=2, num_classes=CLASSES)

tiny_dpn = partial(
    DPN,
    k_sec=(1, 1, 1, 2),
    inc_sec=(2, 2, 2, 4),
    k_r=8,
    groups=2,
    num_init_features=8,
    small=True,
    b=True,
    num_classes=CLASSES,
)

tiny_lowformer = partial(
    LowFormer, width_list=[4, 8, 8, 16, 16], depth_list=[0, 1, 1, 1, 1], head_widths=(24, 20), num_classes=CLASSES
)

HRNET_WIDTH = 3


def narrow_hrnet() -> HighResolutionNet:
    """hrnet_w18_small with final_layer narrowed from 2048 to HRNET_WIDTH channels (timm hard-codes the head widths)."""
    model = timm.create_model("hrnet_w18_small", num_classes=CLASSES)
    model.final_layer = nn.Sequential(
        nn.Conv2d(1024, HRNET_WIDTH, 1), nn.BatchNorm2d(HRNET_WIDTH), nn.ReLU(inplace=True)
    )
    model.classifier = nn.Linear(HRNET_WIDTH, CLASSES)
    return model


# 96 features: channels = 96 // 24 = 4, the last cell's branches are 4 * 4 = 16 wide.
tiny_nasnet = partial(NASNetALarge, num_classes=CLASSES, stem_size=8, num_features=96)


def tiny_rdnet(last_block: str = "Block", **kwargs: object) -> RDNet:
    return RDNet(
        num_classes=CLASSES,
        growth_rates=(8, 8),
        num_blocks_list=(1, 2),
        is_downsample_block=(None, True),
        block_type=("Block", last_block),
        num_init_features=8,
        bottleneck_width_ratio=1.0,
        **kwargs,
    )
