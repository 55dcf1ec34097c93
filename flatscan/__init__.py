"""flatscan: exact Hessian trace and relative flatness of the feature layer of pretrained CNN classifiers."""

from flatscan.contract import NormalisedHead, Tap
from flatscan.errors import FlatscanError, ScanError, ScanInterrupted, UnsupportedModel
from flatscan.flatness import Activation
from flatscan.inference import inference_form
from flatscan.registry import Adapter, describe, list_adapters, register
from flatscan.scanner import ScanResult, scan
from flatscan.verify import VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Adapter",
    "FlatscanError",
    "NormalisedHead",
    "ScanError",
    "ScanInterrupted",
    "ScanResult",
    "Tap",
    "UnsupportedModel",
    "VerifyResult",
    "__version__",
    "describe",
    "inference_form",
    "list_adapters",
    "register",
    "scan",
    "verify",
]
