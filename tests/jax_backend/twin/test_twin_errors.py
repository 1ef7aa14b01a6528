"""The JAX twin refuses an operation it has no rule for, naming it (a row of docs/errors.md)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")

import dualhess  # noqa: E402
from jax_backend import from_torch  # noqa: E402


class SpectralFeatures(torch.nn.Module):
    """A forward through torch.fft, which the twin does not translate."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.fft.rfft(self.linear(x)).abs()


@pytest.mark.errors_table
def test_twin_of_an_unsupported_operation():
    with pytest.raises(dualhess.UnsupportedOpError, match="fft"):
        from_torch(SpectralFeatures(), torch.randn(6, 4))
