"""Built-in adapters, one module per model family; importing this package registers them.

Installed as ``flatscan.adapters``. Each adapter is the only code that knows its family's layout.
"""

from flatscan.adapters import (
    byobnet,
    convnext,
    cspnet,
    densenet,
    efficientnet,
    ghostnet,
    hgnet,
    mobilenetv3,
    regnet,
    resnet,
    resnetv2,
    rexnet,
    vgg,
)

__all__ = [
    "byobnet",
    "convnext",
    "cspnet",
    "densenet",
    "efficientnet",
    "ghostnet",
    "hgnet",
    "mobilenetv3",
    "regnet",
    "resnet",
    "resnetv2",
    "rexnet",
    "vgg",
]
