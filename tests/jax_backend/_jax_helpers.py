"""Helpers shared by the JAX backend tests (imported by name: no package, no conftest)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax

NUM_SAMPLES = 40
BATCH_SIZE = 16  # -> batches of 16, 16 and an unequal last batch of 8


def batches_of(x, y, size=BATCH_SIZE):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def cross_entropy(outputs, targets):
    """Per-sample optax loss: the adapters average it."""
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def mean_cross_entropy(outputs, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, targets))


def relative_error(got, expected):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def run_on_four_devices(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter whose JAX sees 4 host CPU devices (the flag must be
    set before jax starts, so not in this process); this folder is on its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
