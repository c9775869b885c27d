"""Seeded fixtures for the model tests: a tiny random-init config and a few items."""
from __future__ import annotations

import pytest
import torch

from em3.data.images import render_poster
from em3.model import ModelConfig
from em3.types import ItemContent


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def items() -> list[ItemContent]:
    genres = [["Comedy"], ["Drama", "War"], ["Horror"], ["Sci-Fi", "Action"], ["Romance"], ["Western"]]
    return [ItemContent(item_id=f"i{k}", text=f"Movie {k} ({1990 + k}) | {' '.join(g)}",
                        image=render_poster(f"Movie {k}", 1990 + k, g, 32)) for k, g in enumerate(genres)]
