"""Fixtures for the fine-tuning tests that train tiny models in a loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: a second OpenMP thread only adds synchronisation (4x slower on a loaded 2-core machine).
    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
