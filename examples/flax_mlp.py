"""A dualhess model file (Flax nnx): a small MLP on scikit-learn's digits.

Run it with::

    dualhess analyze examples/flax_mlp.py

``model()`` returns an ``nnx.Module`` (or a linen ``(module, variables)`` pair), ``loss()`` an
optax-style ``(outputs, targets) -> scalar or per-sample values`` (per-sample values are
averaged), ``data()`` one batch ``(inputs, targets)`` of numpy/jax arrays or a list of them.
A Flax model is analysed in JAX.
"""

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

jax.config.update("jax_enable_x64", True)  # float64, as `dualhess analyze --dtype float64`

NUM_SAMPLES = 128


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 8, rngs=rngs, param_dtype=np.float64)
        self.out = nnx.Linear(8, 10, rngs=rngs, param_dtype=np.float64)

    def __call__(self, x):
        return self.out(nnx.tanh(self.hidden(x)))


def data():
    digits = load_digits()
    return digits.data[:NUM_SAMPLES] / 16.0, digits.target[:NUM_SAMPLES]


def model():
    return MLP(nnx.Rngs(0))


def loss():
    return optax.softmax_cross_entropy_with_integer_labels
