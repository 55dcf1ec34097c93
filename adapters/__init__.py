"""Built-in adapters, one module per model family; importing this package registers them.

Installed as ``flatscan.adapters``. Each adapter is the only code that knows its family's layout.
"""

import importlib
import importlib.util

FAMILIES = (
    "byobnet",
    "convit",
    "convnext",
    "cspnet",
    "cspnext",
    "densenet",
    "dla",
    "dpn",
    "efficientnet",
    "efficientvim",
    "efficientvit_mit",
    "fasternet",
    "focalnet",
    "ghostnet",
    "hgnet",
    "hrnet",
    "iformer",
    "inception",
    "inception_next",
    "lcnetv2",
    "lowformer",
    "mambaout",
    "metaformer",
    "mobilenetv3",
    "nasnet",
    "nfnet",
    "pnasnet",
    "rdnet",
    "regnet",
    "repghost",
    "repvit",
    "resnet",
    "resnetv2",
    "rexnet",
    "selecsls",
    "senet",
    "sequencer",
    "shvit",
    "starnet",
    "tresnet",
    "vgg",
    "vovnet",
    "xception",
)

# Families whose timm module the installed timm predates (adapter module -> the import error); nothing to measure.
UNAVAILABLE: dict[str, str] = {}

for _family in FAMILIES:
    try:
        importlib.import_module(f"flatscan.adapters.{_family}")
    except ImportError as error:
        if not (error.name or "").startswith("timm"):
            raise
        UNAVAILABLE[_family] = str(error)

# transformers classifiers, when the optional extra is installed: pip install 'flatscan[transformers]'
if importlib.util.find_spec("transformers") is not None:
    importlib.import_module("flatscan.adapters.hf_transformers")
