"""DenseNet quirks (the contract test covers its autograd comparison): a pruned model."""

from __future__ import annotations

from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_densenet


def test_pruned_is_refused() -> None:
    model = tiny_densenet()
    model.prune_intermediate_layers(indices=[1], prune_head=False)
    assert_refused(model, "does not end in a dense block then norm5")
