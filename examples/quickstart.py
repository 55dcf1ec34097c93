"""Scan random-init timm models on random images, offline: the Python API end to end.

python examples/quickstart.py
"""

from __future__ import annotations

import timm
import torch
from rich.console import Console
from rich.table import Table

import flatscan

# timm zero-initialises the last BatchNorm of each ResNet block and starts ConvNeXt's layer scale
# at 1e-6, which makes a random-init feature layer's curvature (nearly) zero; undo both here.
MODELS = {
    "resnet18": dict(zero_init_last=False),
    "efficientnet_b0": {},
    "convnext_atto": dict(ls_init_value=1.0),
    "seresnet18": dict(zero_init_last=False),
}


def main() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 96, 96), torch.randint(0, 1000, (8,))) for _ in range(4)]
    console = Console()
    table = Table(title="random-init timm models, 32 random images at 96 px")
    for column in ("model", "feature layer", "Tr(H) ± se", "kappa ± se", "kappa_W"):
        table.add_column(column)
    for name, kwargs in MODELS.items():
        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            r = flatscan.scan(model, batches)
        except flatscan.UnsupportedModel as refusal:
            console.print(f"{name}: refused: {refusal.reason}")
            continue
        table.add_row(
            name,
            f"{r.feature_layer} ({r.activation})",
            f"{r.trace:.3g} ± {r.trace_se:.1g}",
            f"{r.relative_flatness:.3g} ± {r.relative_flatness_se:.1g}",
            f"{r.classifier_flatness:.3g}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
