"""A tiny Flax nnx model file for the install check (.ci/test_install.py): no scikit-learn,
no torch. Random inputs and labels, a 4-3-2 tanh MLP, float64."""

import numpy as np
import optax
from flax import nnx


def model():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.Linear(4, 3, rngs=rngs, param_dtype=np.float64), nnx.tanh,
                          nnx.Linear(3, 2, rngs=rngs, param_dtype=np.float64))


def loss():
    return optax.softmax_cross_entropy_with_integer_labels


def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((32, 4)), rng.integers(0, 2, 32)
