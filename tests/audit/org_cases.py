"""The test organisation of the audit tests (single machine and Ray): its models, data options and expected rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from hessian_reference import randomise_norms
from timm.models import save_for_hf

from flatscan.io.data import DataOptions

ORG = "test-org"
N = 64
OPTIONS = DataOptions(dataset="digits", batch_size=32, workers=0, img_size=64)  # 64 px keeps the scans quick
# The org's timm image classifiers, most downloaded first: (status, reason pattern) of each after an audit.
EXPECTED = {
    "test-org/resnet": ("ok", None),
    "test-org/corrupt": ("failed", r"^ModelLoadError: .*model.safetensors is not a valid safetensors file"),
    "test-org/efficientnet": ("ok", None),
    "test-org/cbam-resnet": ("unsupported", r"^layer4.0.se \(CbamModule\) gates the feature layer's output"),
    "test-org/no-weights": ("failed", r"^ModelLoadError: hf-hub:test-org/no-weights has no model.safetensors"),
    "test-org/convnext": ("ok", None),
    "test-org/five-classes": ("failed", r"^DataError: labels .* of digits:all are outside the model's 5 classes"),
}
OK = [repo for repo, (status, _) in EXPECTED.items() if status == "ok"]
TRANSFORMERS = "test-org/vit"  # listed (first: most downloads) only with include_transformers
MEASURES = ("n_samples", "trace", "trace_se", "relative_flatness", "relative_flatness_se", "classifier_flatness")
MEASURES += ("loss", "accuracy", "accuracy_top5", "feature_layer")


def save_model(directory: Path, arch: str, num_classes: int = 10, seed: int = 0, **model_args: Any) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes, **model_args).eval()
    randomise_norms(model, torch.Generator().manual_seed(seed))
    save_for_hf(model, str(directory), safe_serialization=True, model_args=model_args or None)
    return directory
