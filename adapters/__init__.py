"""Built-in adapters, one module per model family; importing this package registers them.

Installed as ``flatscan.adapters``. Each adapter is the only code that knows its family's layout.
"""

from flatscan.adapters import (
    byobnet,
    convnext,
    cspnet,
    densenet,
    dla,
    dpn,
    efficientnet,
    ghostnet,
    hgnet,
    hrnet,
    inception,
    mobilenetv3,
    nfnet,
    regnet,
    resnet,
    resnetv2,
    rexnet,
    selecsls,
    senet,
    tresnet,
    vgg,
    xception,
)

__all__ = [
    "byobnet",
    "convnext",
    "cspnet",
    "densenet",
    "dla",
    "dpn",
    "efficientnet",
    "ghostnet",
    "hgnet",
    "hrnet",
    "inception",
    "mobilenetv3",
    "nfnet",
    "regnet",
    "resnet",
    "resnetv2",
    "rexnet",
    "selecsls",
    "senet",
    "tresnet",
    "vgg",
    "xception",
]
