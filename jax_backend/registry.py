"""The JAX backend as the core's registry sees it (:class:`dualhess.backends.Backend`).

Besides Flax models it builds the JAX side of a cross-framework check: the twin of a PyTorch
model (:func:`jax_backend.convert.from_torch`) and its Hessian over the same data. It reads
torch objects with torch itself, never through ``torch_backend``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualhess._alignment import Alignment

__all__ = ["JaxBackend", "dualhess_backend", "jax_dtype"]


def jax_dtype(dtype: Any) -> Any:
    """Accept ``"float64"``/``"float32"`` (or a torch/numpy dtype) and return a jnp dtype."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name in ("float64", "double"):
        return jnp.float64
    if name in ("float32", "float"):
        return jnp.float32
    return dtype


def _is_linen_pair(model: Any) -> bool:
    if not (isinstance(model, tuple) and len(model) == 2):
        return False
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model[0], nn.Module) and hasattr(model[1], "keys")


def _is_nnx(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


def _torch_batches(data: Any) -> list[Any]:
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return [data]
    return list(data)


def _select_block(twin: Any, names: list[str]) -> tuple[dict, Any, Alignment]:
    """Split the twin's params into (selected sub-tree, merge function, block alignment)."""
    wanted = set(names)
    selected: dict[str, Any] = {}
    for entry in twin.torch_layout.entries:
        if entry.name in wanted:
            node, path = twin.params, entry.name.split(".")
            for key in path:
                node = node[key]
            cursor = selected
            for key in path[:-1]:
                cursor = cursor.setdefault(key, {})
            cursor[path[-1]] = node

    def merge(sub: dict[str, Any]) -> dict[str, Any]:
        def rec(full: Any, part: Any) -> Any:
            if not isinstance(full, dict):
                return part
            return {k: (rec(v, part[k]) if k in part else v) for k, v in full.items()}

        return rec(twin.params, sub)

    # torch positions of the block, in torch order
    torch_idx = np.concatenate([idx for name, idx in twin.align.blocks if name in wanted])
    position = {int(t): i for i, t in enumerate(torch_idx)}
    full_jax_to_torch = twin.align.perm  # jax position p holds torch index perm[p]
    perm = np.array([position[int(t)] for t in full_jax_to_torch if int(t) in position], dtype=np.int64)
    blocks, start = [], 0
    for name, idx in twin.align.blocks:
        if name in wanted:
            blocks.append((name, np.arange(start, start + idx.shape[0])))
            start += idx.shape[0]
    return selected, merge, Alignment(perm, blocks)


class JaxBackend:
    """Builds JAX curvature operators for the core's dispatching functions and the CLI."""

    name = "jax"

    def owns(self, model: Any) -> bool:
        return _is_nnx(model) or _is_linen_pair(model)

    def parameter_names(self, model: Any) -> list[str]:
        from ._data import path_name

        if _is_nnx(model):
            from flax import nnx

            _, params, _ = nnx.split(model, nnx.Param, ...)
            tree = nnx.to_pure_dict(params)
            prefix = ""
        elif _is_linen_pair(model):
            tree, prefix = model[1]["params"], "params."
        else:
            raise TypeError(f"the jax backend does not own {type(model).__name__}")
        paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [prefix + path_name(path) for path, _ in paths]

    def hessian(self, model: Any, loss_fn: Any, data: Any, **options: Any) -> Any:
        import inspect

        from ._flax import from_linen, from_nnx

        options["dtype"] = jax_dtype(options.get("dtype"))
        if options.pop("params", None) is not None:
            raise NotImplementedError(
                "parameter blocks (params=) are not supported for Flax models yet; "
                "analyse the whole model"
            )
        if _is_nnx(model):
            build, args = from_nnx, (model, loss_fn, data)
        elif _is_linen_pair(model):
            build, args = from_linen, (model[0], model[1], loss_fn, data)
        else:
            raise TypeError(f"the jax backend does not own {type(model).__name__}")
        accepted = set(inspect.signature(build).parameters)
        unknown = sorted(k for k, v in options.items() if k not in accepted and v is not None)
        if unknown:
            raise TypeError(
                f"the JAX backend has no option {', '.join(map(repr, unknown))} for a Flax "
                f"model; it takes {', '.join(sorted(accepted - {'model', 'module', 'variables', 'loss', 'data'}))}"
                " (method= and device= are PyTorch options: JAX runs one jitted "
                "forward-over-reverse product on JAX's default device)"
            )
        return build(*args, **{k: v for k, v in options.items() if k in accepted})

    def can_twin(self, model: Any) -> bool:
        import sys

        if "torch" not in sys.modules:  # a torch model cannot exist without torch imported
            return False
        import torch

        return isinstance(model, torch.nn.Module)

    def demo_problem(self, **options: Any) -> Any:
        raise NotImplementedError(
            "the demo of dualhess analyze is a PyTorch model (torch_backend.examples); "
            "install the torch backend: pip install 'dualhess[torch]'"
        )

    def twin_hessian(
        self,
        torch_model: Any,
        torch_loss: Any,
        torch_data: Any,
        *,
        dtype: Any = "float64",
        params: Any = None,
        chunk_size: int | None = None,
    ) -> tuple[Any, Alignment]:
        """The Hessian of a PyTorch model's Flax/JAX twin over the same data.

        Returns the JAX operator and the :class:`~dualhess.alignment.Alignment` from the torch
        operator's flat order (``torch_backend.hessian(..., params=params)``) to its own.
        """
        from ._convert import batch_from_torch, from_torch, loss_from_torch
        from ._hessian import hessian

        jdtype = jax_dtype(dtype)
        if jdtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise TypeError(
                "a float64 cross-check needs JAX's 64-bit mode: call "
                'jax.config.update("jax_enable_x64", True) at the start of the program'
            )
        batches = _torch_batches(torch_data)
        if not batches:
            raise ValueError("twin_hessian: the data is empty")
        inputs0 = batches[0][0]
        twin = from_torch(torch_model, inputs0, dtype=np.dtype(np.float64 if jdtype == jnp.float64 else np.float32))
        loss = loss_from_torch(torch_loss)
        reduction = getattr(torch_loss, "reduction", "mean")
        jax_batches = [tuple(batch_from_torch(tuple(b))) for b in batches]

        def call(p: Any, inputs: Any) -> Any:
            return twin.apply(p, *inputs) if isinstance(inputs, (tuple, list)) else twin.apply(p, inputs)

        if params is None:
            align, tree = twin.align, twin.params

            def full(p: Any) -> Any:
                return p
        else:
            from dualhess._operator import ParamLayout

            names = [e.name for e in twin.torch_layout.select(params)] if not isinstance(params, ParamLayout) else params.names
            tree, full, align = _select_block(twin, names)

        if reduction == "sum":
            # jax_backend.hessian averages over samples; a summed loss is N x that average.
            total = sum(int(np.shape(b[1])[0]) for b in jax_batches)

            def loss_fn(p: Any, batch: Any) -> Any:
                inputs, targets = batch
                return loss(call(full(p), inputs), targets) / np.shape(targets)[0] * total
        else:

            def loss_fn(p: Any, batch: Any) -> Any:
                inputs, targets = batch
                return loss(call(full(p), inputs), targets)

        op = hessian(loss_fn, tree, jax_batches, chunk_size=chunk_size, dtype=jdtype)
        op.twin = twin
        return op, align

    def version_info(self) -> dict[str, str]:
        info = {"jax": jax.__version__}
        for dist in ("jaxlib", "flax", "optax"):
            try:
                from importlib.metadata import version

                info[dist] = version(dist)
            except Exception:  # noqa: BLE001 - optional packages
                pass
        return info


def dualhess_backend() -> JaxBackend:
    return JaxBackend()
