"""Every test starts from the same global RNG state, so a model a test builds is the same whatever ran before, and
from a clean Hugging Face environment: a user's HF_* variables (HF_HUB_OFFLINE on an offline cluster, HF_ENDPOINT, a
token) must not change what a test sees. Tests that need one set it themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from huggingface_hub import constants


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _hermetic_hub() -> Iterator[None]:
    # Once, before any other fixture: fixtures and tests that point huggingface_hub somewhere set it after this.
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in [name for name in os.environ if name.startswith(("HF_", "HUGGING_FACE_"))]:
            if name not in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):  # where caches live, not what is reached
                monkeypatch.delenv(name)
        # huggingface_hub read these at import, before this fixture could clear the variables.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", "https://huggingface.co/{repo_id}/resolve/{revision}/{filename}"
        )
        yield
