"""A drop-in replacement for PyHessian 0.1's ``hessian`` class, computed with dualhess.

Change one import::

    # from pyhessian import hessian
    from torch_backend.pyhessian import hessian

The constructor (``model, criterion, data=None, dataloader=None, cuda=True``), the methods
``eigenvalues(maxIter=100, tol=1e-3, top_n=1)``, ``trace(maxIter=100, tol=1e-3)`` and
``density(iter=100, n_v=1)`` and their return shapes are PyHessian's. The numbers come from
dualhess's algorithms on a :func:`torch_backend.hessian` operator, without PyHessian 0.1's
bugs:

* ``eigenvalues`` returns the ``top_n`` largest *algebraic* eigenvalues, descending
  (thick-restart Lanczos, :func:`dualhess.eigsh.eigsh`). PyHessian's power iteration returns
  the largest-``|lambda|`` ones in discovery order (a large negative eigenvalue comes
  first); ``selection="pyhessian"`` reproduces that with :func:`dualhess.power.power_iteration`.
* ``trace`` returns Hutchinson samples and stops with PyHessian's rule on the relative change
  of the running mean, but with ``|previous mean|`` in the denominator: PyHessian divides by
  the signed mean, so a negative trace stops it after two samples.
* ``density`` works on torch 2.x (PyHessian calls ``torch.eig``, removed in torch 2.0).
* the operator never touches ``.grad``: PyHessian's ``loss.backward(create_graph=True)``
  accumulates into ``.grad``, so a second ``hessian(model, ...)`` on the same model (or one
  after a training step that did not zero the gradients) analyses ``2 H``.
* ``cuda=True`` without CUDA warns and falls back to the CPU (PyHessian crashes).

References
----------
Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of
the Hessian", IEEE BigData (2020).

Examples
--------
>>> import torch
>>> from torch_backend.pyhessian import hessian
>>> from torch_backend.examples import load_digits, make_mlp
>>> X, y = load_digits(n=64, flat=True)
>>> comp = hessian(make_mlp(hidden=4), torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False,
...                seed=0)
>>> values, vectors = comp.eigenvalues(top_n=2)
>>> values[0] >= values[1], [v.shape for v in vectors[0]][:2]
(True, [torch.Size([4, 64]), torch.Size([4])])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dualhess._array import default_rng
from dualhess._density import density as _density
from dualhess._eigsh import eigsh
from dualhess._trace import trace as _trace

from ._hessian import HessianOperator
from ._hessian import hessian as _hessian_operator

__all__ = ["hessian", "SELECTIONS"]

#: Eigenvalue selections of :meth:`hessian.eigenvalues`.
SELECTIONS = ("algebraic", "magnitude", "pyhessian")

#: Hutchinson probes are drawn in blocks of this many columns (one ``matmat`` each); the
#: stopping rule is then applied sample by sample, so the result does not depend on it.
TRACE_BLOCK = 10


def _check_selection(selection: Any) -> str:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return selection


class hessian:  # noqa: N801 - PyHessian's name, so that only the import changes
    """PyHessian 0.1's ``hessian`` class on a dualhess operator.

    Parameters
    ----------
    model : torch.nn.Module
        The model. As in PyHessian it is put into eval mode (``model.eval()``); its
        parameters and ``.grad`` are never changed.
    criterion : callable
        The loss, e.g. ``torch.nn.CrossEntropyLoss()`` (mean or sum reduction).
    data : (inputs, targets), optional
        One batch. Exactly one of ``data`` and ``dataloader`` must be given.
    dataloader : iterable of batches, optional
        E.g. a ``DataLoader`` with ``shuffle=False``: the Hessian of the loss over all its
        samples. Batches are weighted by the loss's normaliser (by size, as PyHessian, for
        a plain mean; by kept labels for ``CrossEntropyLoss(ignore_index=...)`` and by the
        class-weight sums for ``weight=``, where PyHessian's size weighting is wrong). A
        shuffled loader is refused, since every product must see the same samples.
    cuda : bool
        Run on CUDA (a copy of the model and the data are moved there). Without CUDA a
        ``RuntimeWarning`` is issued and the CPU is used.
    selection : {"algebraic", "magnitude", "pyhessian"}
        Default eigenvalue selection of :meth:`eigenvalues`.
    seed : int, numpy.random.Generator or None
        Randomness of all probes and start vectors (None: truly random, as PyHessian).
    dtype : torch.dtype, optional
        Analyse a copy of the model and data in this dtype (e.g. ``torch.float64``).
    method : str
        HVP engine of :func:`torch_backend.hessian` (``"pyhessian"`` uses PyHessian's own
        ``hessian_vector_product``).

    Attributes
    ----------
    operator : torch_backend.HessianOperator
        The Hessian as a dualhess operator, for everything beyond PyHessian's API.
    params : list of torch.nn.Parameter
        The parameters with ``requires_grad``, in the order of the eigenvector lists.
    device : str
        ``"cuda"`` or ``"cpu"``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        criterion: Callable[..., Any],
        data: Any = None,
        dataloader: Any = None,
        cuda: bool = True,
        *,
        selection: str = "algebraic",
        seed: Any = None,
        dtype: torch.dtype | None = None,
        method: str = "auto",
    ) -> None:
        if (data is None) == (dataloader is None):
            raise ValueError(
                "hessian: pass exactly one of data=(inputs, targets) (one batch) and "
                "dataloader= (an iterable of batches)"
            )
        self.selection = _check_selection(selection)
        if cuda and not torch.cuda.is_available():
            warnings.warn(
                "hessian(cuda=True): CUDA is not available, falling back to the CPU "
                "(pass cuda=False to silence this warning)",
                RuntimeWarning,
                stacklevel=2,
            )
            cuda = False
        self.device = "cuda" if cuda else "cpu"
        self.model = model.eval()
        self.criterion = criterion
        self.full_dataset = data is None
        self.data = dataloader if self.full_dataset else data
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._rng = default_rng(seed)
        self.operator: HessianOperator = _hessian_operator(
            model, criterion, self.data, device=self.device, dtype=dtype, method=method
        )

    # ------------------------------------------------------------------ helpers
    def _to_list(self, flat: torch.Tensor) -> list[torch.Tensor]:
        parts = self.operator.split(flat)
        return [parts[name].clone() for name in self.operator.layout.names]

    def _to_flat(self, v: list[torch.Tensor]) -> torch.Tensor:
        names = self.operator.layout.names
        if len(v) != len(names):
            raise ValueError(
                f"expected a list of {len(names)} tensors (one per parameter), got {len(v)}"
            )
        flat = torch.cat([t.reshape(-1) for t in v])
        return flat.to(dtype=self.operator.dtype, device=self.operator.device)

    def dataloader_hv_product(self, v: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """PyHessian's ``(v^T H v, H v)`` for a list of tensors shaped like the parameters."""
        flat = self._to_flat(v)
        hv = self.operator.matvec(flat)
        return float(torch.dot(hv, flat)), self._to_list(hv)

    # ------------------------------------------------------------------ PyHessian API
    def eigenvalues(
        self,
        maxIter: int = 100,  # noqa: N803 - PyHessian's argument names
        tol: float = 1e-3,
        top_n: int = 1,
        *,
        selection: str | None = None,
    ) -> tuple[list[float], list[list[torch.Tensor]]]:
        """The ``top_n`` top eigenvalues and eigenvectors (PyHessian's return shapes).

        Parameters
        ----------
        maxIter : int
            Budget: ``maxIter * top_n`` products for Lanczos; for ``selection="pyhessian"``,
            power-iteration steps per eigenvalue (as PyHessian).
        tol : float
            Lanczos: relative residual ``||H v - lambda v|| <= tol * ||H||``, so each
            eigenvalue is within ``tol * ||H||`` of an exact one. ``"pyhessian"``: the
            relative change of the Rayleigh quotient between power steps (PyHessian's rule).
        top_n : int
            How many eigenpairs.
        selection : {"algebraic", "magnitude", "pyhessian"}, optional
            ``"algebraic"``: largest ``lambda``, descending. ``"magnitude"``: largest
            ``|lambda|``, by ``|lambda|`` descending. ``"pyhessian"``: PyHessian's power
            iteration with deflation (largest ``|lambda|``, in discovery order). Default: the
            constructor's ``selection``.

        Returns
        -------
        eigenvalues : list of float
        eigenvectors : list of lists of tensors
            One list per eigenvalue, one unit-norm (jointly) tensor per parameter.
        """
        selection = _check_selection(self.selection if selection is None else selection)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be a positive int, got {top_n!r}")
        if isinstance(maxIter, bool) or not isinstance(maxIter, int) or maxIter < 1:
            raise ValueError(f"maxIter must be a positive int, got {maxIter!r}")
        op = self.operator
        if top_n > op.n:
            raise ValueError(f"top_n={top_n} exceeds the number of parameters {op.n}")
        if selection == "pyhessian":
            from dualhess._power import power_iteration

            eig = power_iteration(op, k=top_n, max_iter=maxIter, tol=tol, seed=self._rng)
            values, vectors = np.asarray(eig.values), eig.vectors
        elif top_n >= op.n - 1 or op.n <= 3:
            # Tiny problems: the dense matrix is cheaper than a Krylov method.
            dense = op.to_dense()
            w, V = torch.linalg.eigh(0.5 * (dense + dense.T))
            order = torch.argsort(w.abs() if selection == "magnitude" else w, descending=True)
            order = order[:top_n]
            values, vectors = w[order].cpu().numpy(), V[:, order]
        else:
            which = "LA" if selection == "algebraic" else "LM"
            eig = eigsh(
                op,
                k=top_n,
                which=which,
                tol=tol,
                seed=self._rng,
                max_matvecs=max(maxIter * top_n, 100 + 2 * top_n),
                criterion="residual",  # the eigenvectors are returned too: accurate ones
            )
            values, vectors = np.asarray(eig.values), eig.vectors
        return (
            [float(v) for v in values],
            [self._to_list(vectors[:, j]) for j in range(len(values))],
        )

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:  # noqa: N803
        """Hutchinson samples ``z^T H z`` (Rademacher ``z``), as PyHessian.

        Sampling stops after ``maxIter`` samples, or at the first sample where the running
        mean changes by less than ``tol`` relative to the previous mean,
        ``|mean_i - mean_{i-1}| / (|mean_{i-1}| + 1e-6) < tol`` (PyHessian's rule, with the
        absolute value that PyHessian forgot). The trace estimate is ``np.mean(samples)``,
        its standard error ``np.std(samples, ddof=1) / sqrt(len(samples))``.

        Returns
        -------
        list of float
            The samples.
        """
        if isinstance(maxIter, bool) or not isinstance(maxIter, int) or maxIter < 1:
            raise ValueError(f"maxIter must be a positive int, got {maxIter!r}")
        samples: list[float] = []
        previous = 0.0
        while len(samples) < maxIter:
            block = min(TRACE_BLOCK, maxIter - len(samples))
            est = _trace(
                self.operator,
                method="hutchinson",
                num_matvecs=block,
                seed=self._rng,
                distribution="rademacher",
            )
            for value in np.asarray(est.samples, dtype=np.float64):
                samples.append(float(value))
                mean = float(np.mean(samples))
                if abs(mean - previous) / (abs(previous) + 1e-6) < tol:
                    return samples
                previous = mean
        return samples

    def density(
        self,
        iter: int = 100,
        n_v: int = 1,  # noqa: A002 - PyHessian's argument name
    ) -> tuple[list[list[float]], list[list[float]]]:
        """Stochastic Lanczos quadrature (PyHessian's return shapes).

        Parameters
        ----------
        iter : int
            Lanczos steps per probe.
        n_v : int
            Number of Rademacher probes.

        Returns
        -------
        eigen_list_full, weight_list_full : list of ``n_v`` lists of ``iter`` floats
            The Ritz values of each probe and their weights (which sum to 1 per probe).
            A probe that finds an invariant subspace before ``iter`` steps (always when
            ``iter`` exceeds the number of parameters) pads with weight-0 nodes.
        """
        sld = _density(self.operator, num_probes=n_v, num_steps=iter, seed=self._rng)
        nodes, weights = np.asarray(sld.nodes), np.asarray(sld.weights)
        return (
            [[float(x) for x in row] for row in nodes],
            [[float(x) for x in row] for row in weights],
        )
