"""NASNet quirks (the contract test covers its autograd comparison): a pruned model."""

from __future__ import annotations

from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_nasnet


def test_pruned_is_refused() -> None:
    model = tiny_nasnet()
    model.prune_intermediate_layers(indices=[2])
    assert_refused(model, "cell_17 was pruned", size=40)
