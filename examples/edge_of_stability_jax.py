"""The edge of stability, end to end (JAX / optax): the twin of ``edge_of_stability.py``.

Full-batch gradient descent (``optax.sgd``) on scikit-learn's digits with a 64-16-10 tanh MLP
written as a plain parameter pytree, a squared-error loss on one-hot targets and
``lr = 0.8``; :class:`jax_backend.monitor.HessianMonitor` measures the sharpness (the top
Hessian eigenvalue) every 25 steps, and the plot shows it against ``2 / lr = 2.5``
(Cohen et al. 2021, https://arxiv.org/abs/2103.00065). The weights are drawn like PyTorch's
default ``Linear`` initialisation (uniform in ``+-1/sqrt(fan_in)``), from numpy.

Run it with::

    python examples/edge_of_stability_jax.py            # writes edge_of_stability_jax.png
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jax_backend.examples import digits  # noqa: E402
from jax_backend.monitor import HessianMonitor  # noqa: E402


def init_mlp(hidden: int = 16, seed: int = 0) -> dict[str, jax.Array]:
    """``Linear(64, hidden) - tanh - Linear(hidden, 10)``, PyTorch's default init."""
    rng = np.random.default_rng(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        bound = 1.0 / np.sqrt(fan_in)
        return jnp.asarray(rng.uniform(-bound, bound, shape))

    return {"w1": uniform((64, hidden), 64), "b1": uniform((hidden,), 64),
            "w2": uniform((hidden, 10), hidden), "b2": uniform((10,), hidden)}


def loss_fn(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean squared error over every output of every sample (``nn.MSELoss()``)."""
    x, targets = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - targets) ** 2)


def run(steps: int = 1500, lr: float = 0.8, every: int = 25, num_samples: int = 512,
        hidden: int = 16, seed: int = 0) -> tuple[HessianMonitor, list[float]]:
    """Train with full-batch gradient descent; return the monitor and the loss per step."""
    x, labels = digits(num_samples)
    batch = (jnp.asarray(x), jax.nn.one_hot(labels, 10, dtype=jnp.float64))
    params = init_mlp(hidden, seed)
    monitor = HessianMonitor(loss_fn, batch, every=every, metrics=("top_eigenvalue",),
                             tol=1e-4, seed=seed)
    opt = optax.sgd(lr)
    state = opt.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for step in range(steps + 1):
        monitor.step(step, params)
        loss, grads = value_and_grad(params, batch)
        losses.append(float(loss))
        if step < steps:
            updates, state = opt.update(grads, state)
            params = optax.apply_updates(params, updates)
    return monitor, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--out", default="edge_of_stability_jax.png")
    args = parser.parse_args()

    start = time.perf_counter()
    monitor, losses = run(args.steps, args.lr, args.every, hidden=args.hidden)
    sharpness = monitor.values("top_eigenvalue")
    late = sharpness[len(sharpness) // 2:]
    print(f"2/lr = {2 / args.lr:.3g}; sharpness at step 0: {sharpness[0]:.3f}, over the second "
          f"half: {min(late):.3f} to {max(late):.3f}; loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"({time.perf_counter() - start:.1f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    ax_loss.plot(range(len(losses)), losses, color="C2", label="training loss")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss (squared error)")
    ax_loss.set_title("full-batch gradient descent (JAX, optax.sgd)")
    ax_loss.legend()
    monitor.plot(axes=[ax_sharp], reference=2 / args.lr)
    ax_sharp.set_title(rf"sharpness vs $2/\eta$ ($\eta$ = lr = {args.lr:g})")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
