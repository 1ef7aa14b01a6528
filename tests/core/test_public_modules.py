"""One public surface: no public function shadows a module of the same name.

Implementation modules are private (``_eigsh.py``, ``_hessian.py``, ...); each package's
``__init__`` re-exports the public names. Every public submodule imports as a module.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

PACKAGES = ["dualhess", "torch_backend", "jax_backend"]


def _package(name: str) -> types.ModuleType:
    if name == "torch_backend":
        pytest.importorskip("torch")
    if name == "jax_backend":
        pytest.importorskip("jax")
        pytest.importorskip("flax")
    return importlib.import_module(name)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_submodule_imports_as_a_module(package):
    pkg = _package(package)
    public = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    assert public, f"{package} has no public submodule"
    for name in public:
        module = importlib.import_module(f"{package}.{name}")
        assert isinstance(module, types.ModuleType), f"{package}.{name}"
        # the package attribute of that name, once imported, is the module itself
        assert getattr(pkg, name) is module, f"{package}.{name} is shadowed by {getattr(pkg, name)!r}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_name_is_also_a_module(package):
    pkg = _package(package)
    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    clashes = [name for name in getattr(pkg, "__all__", []) if name in modules]
    assert not clashes, f"{package} exports names that are also its modules: {clashes}"


@pytest.mark.parametrize(
    ("package", "names"),
    [
        ("dualhess", ["eigsh", "trace", "density", "diagonal", "lanczos", "crosscheck"]),
        ("torch_backend", ["hessian"]),
        ("jax_backend", ["hessian"]),
    ],
)
def test_functions_named_like_their_old_modules_are_functions(package, names):
    pkg = _package(package)
    for name in names:
        assert callable(getattr(pkg, name)) and not isinstance(getattr(pkg, name), types.ModuleType)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"{package}.{name}")
