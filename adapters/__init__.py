"""Built-in adapters, one module per model family; importing this package registers them.

Installed as ``flatscan.adapters``. Each adapter is the only code that knows its family's layout.
"""

from flatscan.adapters import convnext, densenet, efficientnet, ghostnet, mobilenetv3, regnet, resnet, rexnet, vgg

__all__ = ["convnext", "densenet", "efficientnet", "ghostnet", "mobilenetv3", "regnet", "resnet", "rexnet", "vgg"]
