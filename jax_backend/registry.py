"""The JAX backend as the core's registry sees it (:class:`dualhess.backends.Backend`).

Besides Flax models it builds the JAX side of a cross-framework check: the twin of a PyTorch
model (:func:`jax_backend.from_torch`, from ``torch.export``) and its Hessian over the same data. It reads
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


def _num_samples(targets: Any) -> int:
    leaves = jax.tree_util.tree_leaves(targets)
    return int(np.shape(leaves[0])[0]) if leaves else 1


def _torch_batches(data: Any) -> list[Any]:
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return [data]
    return list(data)


def _select_block(twin: Any, names: list[str]) -> tuple[Any, Any, Alignment]:
    """(the block's parameters, a function completing them to all parameters, its alignment).

    The twin keeps torch's names and order, so the block's alignment is the identity too.
    """
    from .twin import ParamDict
    from .twin._alignment import alignment_by_name

    wanted = set(names)
    selected = ParamDict((n, v) for n, v in twin.params.items() if n in wanted)

    def merge(sub: Any) -> Any:
        return ParamDict((n, sub[n] if n in wanted else v) for n, v in twin.params.items())

    align, _ = alignment_by_name((n, tuple(v.shape)) for n, v in selected.items())
    return selected, merge, align


class JaxBackend:
    """Builds JAX curvature operators for the core's dispatching functions and the CLI."""

    name = "jax"
    accepts_closure = False
    twinned_by: tuple[str, ...] = ()

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

    def hf_problem(self, name_or_dir: Any, **options: Any) -> Any:
        raise NotImplementedError(
            "Hugging Face models are PyTorch models: --hf loads them with the torch backend "
            "(pip install 'dualhess[torch,transformers]'); JAX analyses them through the twin"
        )

    def normalizers(self, model: Any, loss_fn: Any, data: Any, *, dtype: Any) -> Any:
        raise NotImplementedError(
            "the JAX backend reads no normalizers for a twin: no other backend twins a Flax "
            "model (pass normalizer= to jax_backend.hessian for a JAX loss)"
        )

    def derivative_suspects(self, model: Any) -> list[str]:
        return []  # none known: JAX's second derivatives agree with finite differences

    def twin_hessian(
        self,
        torch_model: Any,
        torch_loss: Any,
        torch_data: Any,
        *,
        dtype: Any = "float64",
        params: Any = None,
        chunk_size: int | None = None,
        promote_float32_islands: bool | None = None,
        normalizers: Any = None,
    ) -> tuple[Any, Alignment]:
        """The Hessian of a PyTorch model's JAX twin (model and loss exported together).

        ``torch_loss`` is any ``(outputs, targets) -> scalar`` callable (a loss module, a
        lambda over ``out.logits``); inputs may be tensors, tuples or dicts. Batches of
        another shape (an unequal last batch) get their own exported graph. Returns the JAX
        operator and the :class:`~dualhess.Alignment` from the torch operator's flat order
        (``torch_backend.hessian(..., params=params)``) to its own: the identity, since the
        twin keeps torch's parameter names and order.

        ``normalizers`` (the torch backend's ``normalizers``: kept labels of an
        ``ignore_index``, class-weight sums, per batch) weight the batches exactly as the
        torch operator does; ``None`` keeps the weighting by samples.
        """
        from ._hessian import hessian
        from .twin import batch_from_torch, from_torch

        jdtype = jax_dtype(dtype)
        if jdtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise TypeError(
                "a float64 cross-check needs JAX's 64-bit mode: call "
                'jax.config.update("jax_enable_x64", True) at the start of the program'
            )
        batches = _torch_batches(torch_data)
        if not batches:
            raise ValueError("twin_hessian: the data is empty")
        np_dtype = np.dtype(np.float64 if jdtype == jnp.float64 else np.float32)
        twin = from_torch(torch_model, batches[0][0], loss=torch_loss,
                          example_targets=batches[0][1], dtype=np_dtype,
                          promote_float32_islands=promote_float32_islands)
        for inputs, targets in batches[1:]:
            twin.prepare(inputs, targets)  # export every distinct batch signature now
        reduction = getattr(torch_loss, "reduction", "mean")
        jax_batches = [tuple(batch_from_torch(tuple(b))) for b in batches]

        if params is None:
            align, tree = twin.align, twin.params

            def full(p: Any) -> Any:
                return p
        else:
            from dualhess._operator import ParamLayout

            names = (params.names if isinstance(params, ParamLayout)
                     else [e.name for e in twin.torch_layout.select(params)])
            tree, full, align = _select_block(twin, names)

        if reduction == "sum":
            # jax_backend.hessian averages over samples; a summed loss is N x that average.
            total = sum(_num_samples(b[1]) for b in jax_batches)

            def loss_fn(p: Any, batch: Any) -> Any:
                inputs, targets = batch
                return twin.loss(full(p), inputs, targets) / _num_samples(targets) * total
        else:

            def loss_fn(p: Any, batch: Any) -> Any:
                inputs, targets = batch[0], batch[1]
                return twin.loss(full(p), inputs, targets)

        options: dict[str, Any] = {}
        if normalizers is not None and reduction != "sum":
            # the torch loss's own normaliser of each batch (kept labels, class-weight sums)
            # rides along as a per-sample column, so batches of one shape can still be
            # stacked; the (mean) loss of batch b then enters with weight m_b / sum m
            if len(normalizers) != len(jax_batches):
                raise ValueError(
                    f"twin_hessian: {len(normalizers)} normalizers for {len(jax_batches)} "
                    "batches"
                )
            jax_batches = [
                (*b, np.full(_num_samples(b[1]), m / max(_num_samples(b[1]), 1), np_dtype))
                for b, m in zip(jax_batches, normalizers)
            ]

            def batch_normalizer(batch: Any) -> Any:
                return batch[2].sum()

            options["normalizer"] = batch_normalizer
        if any(not i.promoted for i in twin.islands):
            import inspect

            # float32 islands are symmetric only to float32 rounding
            if "check_symmetric" in inspect.signature(hessian).parameters:
                options["check_symmetric"] = False
        op = hessian(loss_fn, tree, jax_batches, chunk_size=chunk_size, dtype=jdtype, **options)
        op.twin = twin
        return op, align


def dualhess_backend() -> JaxBackend:
    return JaxBackend()
