"""Small models on scikit-learn's digits data, in Flax linen and nnx (tests, CLI, README).

The models are deliberately tiny (a few hundred parameters) so that their dense Hessians
can serve as exact references. Images are 8 x 8 grey levels scaled to ``[0, 1]``; the MLPs
take flat 64-vectors, the CNNs ``(N, 8, 8, 1)`` NHWC images.

Examples
--------
>>> import optax
>>> from jax_backend import from_nnx
>>> from jax_backend.examples import digits, nnx_model
>>> x, y = digits(32, dtype="float32")
>>> op = from_nnx(nnx_model("mlp"), optax.softmax_cross_entropy_with_integer_labels, (x, y))
>>> op.n
610
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "digits",
    "digits_batches",
    "LinenMLP",
    "LinenCNN",
    "NNXMLP",
    "NNXCNN",
    "linen_model",
    "nnx_model",
]


def digits(
    num_samples: int | None = None, *, image: bool = False, dtype: Any = "float64"
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_samples`` digits as ``(x, y)`` numpy arrays.

    ``x`` has shape ``(N, 64)`` (or ``(N, 8, 8, 1)`` with ``image=True``), values in
    ``[0, 1]``; ``y`` holds integer labels 0-9 (int32).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int32)
    if num_samples is not None:
        x, y = x[:num_samples], y[:num_samples]
    if image:
        x = x.reshape(-1, 8, 8, 1)
    return x.astype(dtype), y


def digits_batches(
    num_samples: int, batch_size: int, *, image: bool = False, dtype: Any = "float64"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``num_samples`` digits cut into batches (the last one may be smaller)."""
    x, y = digits(num_samples, image=image, dtype=dtype)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class LinenMLP(nn.Module):
    """64 -> hidden (tanh, optional BatchNorm) -> 10."""

    hidden: int = 8
    batch_norm: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, param_dtype=self.param_dtype)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, param_dtype=self.param_dtype)(x)
        x = jnp.tanh(x)
        return nn.Dense(10, param_dtype=self.param_dtype)(x)


class LinenCNN(nn.Module):
    """3x3 conv, stride 2 (8x8x1 -> 4x4xC), tanh, dense -> 10."""

    channels: int = 4
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.Conv(self.channels, (3, 3), strides=(2, 2), param_dtype=self.param_dtype)(x)
        x = jnp.tanh(x).reshape((x.shape[0], -1))
        return nn.Dense(10, param_dtype=self.param_dtype)(x)


class NNXMLP(nnx.Module):
    """64 -> hidden (tanh, optional BatchNorm) -> 10."""

    def __init__(
        self,
        hidden: int = 8,
        *,
        batch_norm: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: Any,
    ) -> None:
        self.linear1 = nnx.Linear(64, hidden, param_dtype=param_dtype, rngs=rngs)
        norm = None
        if batch_norm:
            norm = nnx.BatchNorm(hidden, param_dtype=param_dtype, rngs=rngs)
            # nnx keeps float32 running statistics; store them in the parameters' dtype
            for stat in (norm.mean, norm.var):
                stat.set_value(jnp.asarray(stat.get_value(), dtype=param_dtype))
        self.norm = norm
        self.linear2 = nnx.Linear(hidden, 10, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        x = self.linear1(x.reshape((x.shape[0], -1)))
        if self.norm is not None:
            x = self.norm(x)
        return self.linear2(jnp.tanh(x))


class NNXCNN(nnx.Module):
    """3x3 conv, stride 2 (8x8x1 -> 4x4xC), tanh, dense -> 10."""

    def __init__(self, channels: int = 4, *, param_dtype: Any = jnp.float32, rngs: Any) -> None:
        self.conv = nnx.Conv(
            1, channels, (3, 3), strides=(2, 2), param_dtype=param_dtype, rngs=rngs
        )
        self.linear = nnx.Linear(16 * channels, 10, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        x = jnp.tanh(self.conv(x))
        return self.linear(x.reshape((x.shape[0], -1)))


def linen_model(
    kind: str = "mlp", *, seed: int = 0, param_dtype: Any = jnp.float32, **kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """A linen digits model and its initialised variables: ``(module, variables)``.

    ``kind`` is ``"mlp"`` (inputs ``(N, 64)``) or ``"cnn"`` (inputs ``(N, 8, 8, 1)``);
    ``kwargs`` go to the module (``hidden``, ``batch_norm``, ``channels``).
    """
    if kind == "mlp":
        module = LinenMLP(param_dtype=param_dtype, **kwargs)
        dummy = jnp.zeros((1, 64), dtype=param_dtype)
    elif kind == "cnn":
        module = LinenCNN(param_dtype=param_dtype, **kwargs)
        dummy = jnp.zeros((1, 8, 8, 1), dtype=param_dtype)
    else:
        raise ValueError(f"kind must be 'mlp' or 'cnn', got {kind!r}")
    variables = jax.jit(module.init)(jax.random.key(seed), dummy)
    return module, dict(variables)


def nnx_model(
    kind: str = "mlp", *, seed: int = 0, param_dtype: Any = jnp.float32, **kwargs: Any
) -> Any:
    """An nnx digits model: ``"mlp"`` (inputs ``(N, 64)``) or ``"cnn"`` (``(N, 8, 8, 1)``)."""
    if kind == "mlp":
        return NNXMLP(param_dtype=param_dtype, rngs=nnx.Rngs(seed), **kwargs)
    if kind == "cnn":
        return NNXCNN(param_dtype=param_dtype, rngs=nnx.Rngs(seed), **kwargs)
    raise ValueError(f"kind must be 'mlp' or 'cnn', got {kind!r}")
