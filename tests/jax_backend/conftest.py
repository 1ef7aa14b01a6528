"""Shared fixtures for the JAX backend tests: float64 everywhere, tiny digits models.

Without jax, flax, optax or scikit-learn the whole directory is skipped at collection.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_MISSING = [m for m in ("jax", "flax", "optax", "sklearn") if importlib.util.find_spec(m) is None]
collect_ignore_glob = ["test_*.py"] if _MISSING else []

if not _MISSING:
    import jax

    jax.config.update("jax_enable_x64", True)

    from _jax_helpers import NUM_SAMPLES

    from jax_backend.examples import digits

    @pytest.fixture(scope="session")
    def digits_flat():
        return digits(NUM_SAMPLES)

    @pytest.fixture(scope="session")
    def digits_image():
        return digits(NUM_SAMPLES, image=True)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.jax)
