"""Inception-v3 / v4 (first branch of the last Inception module, a channel slice) and Inception-ResNet-v2 (conv2d_7b).

timm hard-codes every width; the feature layer (and the classifier's matching input) is narrowed to 2 channels
so that the full autograd Hessian stays small.
"""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.layers import ConvNormAct
from timm.models.inception_resnet_v2 import InceptionResnetV2
from timm.models.inception_v3 import InceptionV3
from timm.models.inception_v4 import InceptionV4
from torch import nn

WIDTH = 2


def narrow_v3() -> InceptionV3:
    model = InceptionV3(num_classes=CLASSES)
    model.Mixed_7c.branch1x1 = ConvNormAct(2048, WIDTH, kernel_size=1)
    model.fc = nn.Linear(2048 - 320 + WIDTH, CLASSES)
    return model


def narrow_v4() -> InceptionV4:
    model = InceptionV4(num_classes=CLASSES)
    model.features[-1].branch0 = ConvNormAct(1536, WIDTH, kernel_size=1)
    model.last_linear = nn.Linear(1536 - 256 + WIDTH, CLASSES)
    return model


def narrow_inception_resnet_v2() -> InceptionResnetV2:
    model = InceptionResnetV2(num_classes=CLASSES)
    model.conv2d_7b = ConvNormAct(2080, WIDTH, kernel_size=1)
    model.classif = nn.Linear(WIDTH, CLASSES)
    return model


MODELS = {
    "inception_v3": (narrow_v3, "Mixed_7c.branch1x1.conv", slice(0, WIDTH)),
    "inception_v4": (narrow_v4, "features.21.branch0.conv", slice(0, WIDTH)),
    "inception_resnet_v2": (narrow_inception_resnet_v2, "conv2d_7b.conv", slice(None)),
}


@pytest.mark.parametrize("family", MODELS)
def test_inception_matches_autograd(family: str) -> None:
    build, feature_layer, channels = MODELS[family]
    head = assert_matches_autograd(build(), family, size=75)
    assert head.feature_layer == feature_layer
    assert head.channels == channels
    assert head.activation.name == "relu"


def pruned_v4() -> InceptionV4:
    model = InceptionV4(num_classes=CLASSES)
    model.prune_intermediate_layers(indices=[3], prune_head=False)
    return model


REFUSALS = {
    "max_pool": (lambda: InceptionV3(num_classes=CLASSES, global_pool="max"), "not a global average"),
    "no_classifier": (lambda: InceptionResnetV2(num_classes=0), "not a Linear classifier"),
    "pruned_v4": (pruned_v4, "not an InceptionC module"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=75)
