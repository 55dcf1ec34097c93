"""Every test starts from the same global RNG state, so a model a test builds is the same whatever ran before."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
