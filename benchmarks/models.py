"""Benchmark models, data and exact references (torch and JAX twins with identical weights).

The CPU suite uses scikit-learn's digits (8 x 8 images, 10 classes), the first
``batch`` samples, pixels scaled to [0, 1], and a mean cross-entropy loss:

- ``mlp``: Linear(64, 32) - tanh - Linear(32, 10) (2,410 parameters);
- ``cnn``: Conv(1 -> 8, 3x3) - ReLU - Conv(8 -> 8, 3x3) - ReLU - Linear(128, 10) (1,954);
- ``mlp_large``: Linear(64, 256) - tanh - Linear(256, 256) - tanh - Linear(256, 10)
  (85,002), for timing only (no dense reference).

The exact Hessian is built independently of dualhess and of the torch code under test: by JAX
(``jax.jvp`` of ``jax.grad``) on a plain-JAX twin with identical float64 weights, symmetrised,
and diagonalised with ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "Task",
    "load_digits",
    "make_model",
    "build_task",
    "flat_loss",
    "exact_hessian",
    "jax_twin",
    "MODEL_SPECS",
]

#: name -> (kind, layer sizes or channels); the sizes of the issue's models.
MODEL_SPECS: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp": ("mlp", (64, 32, 10)),
    "cnn": ("cnn", (8, 8)),
    "mlp_large": ("mlp", (64, 256, 256, 10)),
}


def load_digits(batch: int = 512, *, image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first ``batch`` digits as float64 inputs in [0, 1] and int64 labels.

    ``image=True`` returns inputs of shape ``(batch, 1, 8, 8)`` (NCHW), else ``(batch, 64)``.
    """
    from sklearn.datasets import load_digits as _load

    data = _load()
    if not 1 <= batch <= len(data.target):
        raise ValueError(f"batch must be in [1, {len(data.target)}], got {batch}")
    X = np.asarray(data.data[:batch], dtype=np.float64) / 16.0
    y = np.asarray(data.target[:batch], dtype=np.int64)
    if image:
        X = X.reshape(batch, 1, 8, 8)
    return X, y


def make_model(kind: str, sizes: tuple[int, ...], *, seed: int = 0) -> Any:
    """A float64 torch model: ``kind="mlp"`` (tanh between layers) or ``"cnn"`` (2 convs)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "mlp":
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(a, b))
        model = nn.Sequential(*layers)
    elif kind == "cnn":
        c1, c2 = sizes
        model = nn.Sequential(
            nn.Conv2d(1, c1, 3),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, 10),
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}; choose 'mlp' or 'cnn'")
    return model.to(torch.float64).eval()


@dataclasses.dataclass
class Task:
    """One benchmark problem: a float64 torch model, its data and the loss."""

    name: str
    kind: str
    sizes: tuple[int, ...]
    model: Any
    X: Any
    y: Any
    loss_fn: Any

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def data(self) -> tuple[Any, Any]:
        return self.X, self.y


def build_task(name: str, *, batch: int = 512, sizes: tuple[int, ...] | None = None) -> Task:
    """The model ``name`` of :data:`MODEL_SPECS` (or custom ``sizes``) on ``batch`` digits."""
    import torch

    kind, default_sizes = MODEL_SPECS[name]
    sizes = default_sizes if sizes is None else tuple(sizes)
    X, y = load_digits(batch, image=kind == "cnn")
    model = make_model(kind, sizes)
    return Task(
        name,
        kind,
        sizes,
        model,
        torch.from_numpy(X),
        torch.from_numpy(y),
        torch.nn.CrossEntropyLoss(),
    )


def flat_loss(task: Task) -> tuple[Callable[[Any], Any], Any]:
    """``(f, theta0)``: the loss as a function of the flat parameter vector, and its value."""
    import torch

    names = [n for n, _ in task.model.named_parameters()]
    shapes = [p.shape for _, p in task.model.named_parameters()]
    sizes = [p.numel() for _, p in task.model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])

    def f(theta: Any) -> Any:
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(task.model, params, (task.X,))
        return task.loss_fn(out, task.y)

    return f, theta0


def exact_hessian(task: Task, *, chunk_size: int = 256) -> np.ndarray:
    """The dense float64 Hessian, symmetrised, computed by JAX on the task's twin.

    Forward-over-reverse columns ``H e_i`` (``jax.jvp`` of ``jax.grad``), ``chunk_size``
    columns per jitted ``vmap``. JAX rather than torch keeps the reference independent of
    the torch code under test (and XLA's float64 convolutions are several times faster than
    torch's on CPU); the twin's loss equals the torch loss to rounding.
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    with _x64():
        loss_fn, params, batch = jax_twin(task)
        flat, unravel = ravel_pytree(params)
        grad = jax.grad(lambda theta: loss_fn(unravel(theta), batch))
        columns = jax.jit(jax.vmap(lambda v: jax.jvp(grad, (flat,), (v,))[1]))
        n = flat.size
        blocks = []
        for start in range(0, n, chunk_size):
            E = np.zeros((chunk_size, n))
            rows = np.arange(start, min(start + chunk_size, n))
            E[rows - start, rows] = 1.0
            blocks.append(np.asarray(columns(jnp.asarray(E)))[: len(rows)])
        H = np.concatenate(blocks, axis=0).astype(np.float64)
        order = torch_order(task, unravel)
    H = H[np.ix_(order, order)]  # JAX ravel order -> torch parameter order
    return 0.5 * (H + H.T)


def torch_order(task: Task, unravel: Callable[[Any], Any] | None = None) -> np.ndarray:
    """``perm`` with ``flat_torch = flat_jax[perm]`` for the task's JAX twin (needs x64)."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    _, params, _ = jax_twin(task)
    flat, unravel_ = ravel_pytree(params)
    unravel = unravel_ if unravel is None else unravel
    # Label every JAX position with its index, map to the torch layout, read the labels back.
    tree = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    labels = []
    for name, p in task.model.named_parameters():
        leaf = np.asarray(tree[name.replace(".", "_")])
        labels.append((leaf.T if p.ndim == 2 else leaf).reshape(-1))
    perm = np.concatenate(labels).astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(flat.size)):
        raise AssertionError("torch_order: the JAX twin does not cover every torch parameter")
    return perm


class _x64:
    """Context manager: ``jax_enable_x64`` on inside, restored on exit."""

    def __enter__(self) -> None:
        import jax

        self._old = bool(jax.config.jax_enable_x64)
        jax.config.update("jax_enable_x64", True)

    def __exit__(self, *exc: Any) -> None:
        import jax

        jax.config.update("jax_enable_x64", self._old)


# ---------------------------------------------------------------------- JAX twins
def jax_twin(task: Task) -> tuple[Callable[[Any, Any], Any], dict[str, Any], tuple[Any, Any]]:
    """``(loss_fn, params, batch)``: the same model in plain JAX with identical float64 weights.

    Weights are copied from the torch model (Linear ``(out, in)`` -> ``(in, out)``; convs stay
    OIHW with NCHW inputs through ``lax.conv_general_dilated``). Needs ``jax_enable_x64``.
    """
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_enable_x64:
        raise RuntimeError("jax_twin needs jax.config.update('jax_enable_x64', True)")
    tensors = {n.replace(".", "_"): p.detach().numpy().copy() for n, p in task.model.named_parameters()}
    X = jnp.asarray(task.X.numpy())
    y = jnp.asarray(task.y.numpy())
    linear_keys = [k for k in tensors if k.endswith("_weight") and tensors[k].ndim == 2]
    params = {k: jnp.asarray(v.T if k in linear_keys else v) for k, v in tensors.items()}
    modules = list(task.model)
    indices = [str(i) for i, m in enumerate(modules) if hasattr(m, "weight")]

    def cross_entropy(logits: Any, labels: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    if task.kind == "mlp":

        def forward(p: dict[str, Any], x: Any) -> Any:
            for j, i in enumerate(indices):
                if j:
                    x = jnp.tanh(x)
                x = x @ p[f"{i}_weight"] + p[f"{i}_bias"]
            return x

    else:
        c1, c2, lin = indices

        def conv(x: Any, w: Any, b: Any) -> Any:
            out = jax.lax.conv_general_dilated(
                x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
            )
            return out + b[None, :, None, None]

        def forward(p: dict[str, Any], x: Any) -> Any:
            x = jax.nn.relu(conv(x, p[f"{c1}_weight"], p[f"{c1}_bias"]))
            x = jax.nn.relu(conv(x, p[f"{c2}_weight"], p[f"{c2}_bias"]))
            x = x.reshape(x.shape[0], -1)  # NCHW flatten order, like nn.Flatten
            return x @ p[f"{lin}_weight"] + p[f"{lin}_bias"]

    def loss_fn(p: dict[str, Any], batch: tuple[Any, Any]) -> Any:
        inputs, labels = batch
        return cross_entropy(forward(p, inputs), labels)

    return loss_fn, params, (X, y)
