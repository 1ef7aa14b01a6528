"""The embedded default of ``dualhess analyze``: a small CNN trained on scikit-learn's digits.

scikit-learn's bundled 8x8 digits (1797 images, no download) and a small convolutional
network ``Conv(1, 16, 3, pad 1) - ReLU - AvgPool(2) - Flatten - Linear(256, 10)`` (2730
parameters), trained deterministically in PyTorch with plain SGD for a few hundred steps
(about a second on a laptop CPU). The model, the data and the training loop come from
``torch_backend.examples``, loaded through the backend registry: this module imports no
framework itself.

Examples
--------
>>> from dualhess._demo import demo_problem
>>> model, loss_fn, data, info = demo_problem(seed=0)  # doctest: +SKIP
>>> info["num_params"]  # doctest: +SKIP
2730
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["demo_problem", "DEMO_CHANNELS", "DEMO_TRAIN_STEPS", "DEMO_SAMPLES"]

#: Convolution channels of the demo CNN (2730 parameters).
DEMO_CHANNELS = 16
#: SGD steps of the deterministic training (mini-batches of 64, learning rate 0.5).
DEMO_TRAIN_STEPS = 300
#: Samples in the data set of the Hessian (the first ones of digits; training uses all).
DEMO_SAMPLES = 256


def _examples() -> Any:
    from .backends import get_backend

    backend = get_backend("torch")  # BackendUnavailableError with the pip command if missing
    examples = getattr(backend, "examples", None)
    if examples is None:
        examples = importlib.import_module("torch_backend.examples")
    return examples


def demo_problem(
    *,
    seed: int = 0,
    dtype: str = "float64",
    train_steps: int = DEMO_TRAIN_STEPS,
    num_samples: int = DEMO_SAMPLES,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Build and train the demo model; return ``(model, loss_fn, data, info)``.

    Parameters
    ----------
    seed : int
        Seeds the initialisation and the mini-batch order: same seed, same weights.
    dtype : {"float64", "float32"}
        The model and data are trained in float64 and then cast.
    train_steps : int
        SGD steps.
    num_samples : int
        How many digits (the first ones) make the data set of the Hessian.
    log : callable, optional
        Receives one line describing the model.

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    loss_fn : torch.nn.CrossEntropyLoss
    data : (inputs, targets)
        Inputs ``(num_samples, 1, 8, 8)``, integer targets.
    info : dict
        ``description``, ``num_params``, ``train_steps``, ``num_samples``, ``train_accuracy``.
    """
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    ex = _examples()
    X, y = ex.load_digits()
    model = ex.make_cnn(DEMO_CHANNELS, seed=seed)
    ex.train(model, (X, y), steps=train_steps, seed=seed)
    model.eval()
    accuracy = float((model(X).argmax(dim=1) == y).double().mean())
    X, y = X[:num_samples], y[:num_samples]
    if dtype == "float32":
        model = model.float()
        X = X.float()
    loss_fn = ex.nn.CrossEntropyLoss() if hasattr(ex, "nn") else _cross_entropy()
    num_params = sum(p.numel() for p in model.parameters())
    info = {
        "description": (
            f"CNN Conv(1,{DEMO_CHANNELS},3)-ReLU-AvgPool(2)-Linear({DEMO_CHANNELS * 16},10) on "
            f"scikit-learn digits, trained {train_steps} SGD steps (seed {seed}); Hessian of the "
            f"mean cross-entropy over the first {num_samples} digits"
        ),
        "num_params": int(num_params),
        "train_steps": int(train_steps),
        "num_samples": int(num_samples),
        "train_accuracy": accuracy,
    }
    if log is not None:
        log(f"demo: {info['description']}; {num_params} parameters, training accuracy "
            f"{accuracy:.3f}")
    return model, loss_fn, (X, y), info


def _cross_entropy() -> Any:  # pragma: no cover - examples always re-exports nn
    return importlib.import_module("torch.nn").CrossEntropyLoss()
