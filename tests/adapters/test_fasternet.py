"""FasterNet quirks (the contract test covers its autograd comparison): a pruned head."""

from __future__ import annotations

from helpers.adapters import assert_refused
from helpers.tiny_models import tiny_fasternet


def test_pruned_head_is_refused() -> None:
    model = tiny_fasternet()
    model.prune_intermediate_layers(indices=1)
    assert_refused(model, "conv_head is missing")
