"""Cross-check tests run in float64: enable jax x64 and expose the shared model builders.

``_models.py`` is registered as the module ``crosscheck_models`` (a unique name, so it cannot
clash with helper modules of other test folders); test files use ``import crosscheck_models``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

try:
    import jax
except ImportError:  # pragma: no cover - the test modules skip themselves
    jax = None
else:
    jax.config.update("jax_enable_x64", True)


def _register_models() -> None:
    name = "crosscheck_models"
    if name in sys.modules or importlib.util.find_spec("torch") is None:
        return
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_models.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register_models()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: torch's extra threads only spin, and the suite shares its cores (a
    cross-check's torch products ran 100x slower with 2 threads on a loaded machine)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The zoo's ``slow`` cases run only when asked: ``DUALHESS_SLOW=1`` or ``-m slow``
    (the default suite has a time budget)."""
    import os

    if os.environ.get("DUALHESS_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set DUALHESS_SLOW=1 or pass -m slow to run")
    here = str(Path(__file__).parent)
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)
