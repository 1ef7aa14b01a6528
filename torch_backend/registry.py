"""The torch backend as the core's registry sees it (:class:`dualhess.backends.Backend`)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TorchBackend", "dualhess_backend", "torch_dtype"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "double": torch.float64, "float": torch.float32}


def torch_dtype(dtype: Any) -> torch.dtype | None:
    """Accept ``"float64"``/``"float32"`` (framework-neutral names) or a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float64' or 'float32'") from None


class TorchBackend:
    """Builds torch curvature operators for the core's dispatching functions and the CLI."""

    name = "torch"
    accepts_closure = True
    twinned_by: tuple[str, ...] = ("jax",)

    def owns(self, model: Any) -> bool:
        return isinstance(model, torch.nn.Module)

    def parameter_names(self, model: Any) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def hessian(self, model: Any, loss_fn: Any, data: Any, **options: Any) -> Any:
        from ._hessian import hessian

        options["dtype"] = torch_dtype(options.get("dtype"))
        return hessian(model, loss_fn, data, **options)

    def normalizers(self, model: Any, loss_fn: Any, data: Any, *, dtype: Any) -> Any:
        from ._hessian import batch_normalizers

        return batch_normalizers(model, loss_fn, data, dtype=torch_dtype(dtype))

    def derivative_suspects(self, model: Any) -> list[str]:
        from ._validity import weight_norm_suspects

        return weight_norm_suspects(model)

    def can_twin(self, model: Any) -> bool:
        return False  # no PyTorch twin of a Flax model (the JAX backend twins torch models)

    def twin_hessian(self, model: Any, loss_fn: Any, data: Any, **options: Any) -> Any:
        raise NotImplementedError(
            f"the torch backend builds no twin of {type(model).__name__}: a Flax model is "
            "analysed in JAX only"
        )

    def hf_problem(self, name_or_dir: Any, **options: Any) -> Any:
        from ._hf import hf_problem

        return hf_problem(name_or_dir, **options)

    def demo_problem(self, **options: Any) -> Any:
        from .examples import demo_problem

        return demo_problem(**options)


def dualhess_backend() -> TorchBackend:
    return TorchBackend()
