"""Loss landscapes: the loss along one or two directions through the current parameters.

A slice of the loss surface through ``theta``: ``f(a) = L(theta + a d)`` for one direction
(1-D) or ``f(a, b) = L(theta + a d_1 + b d_2)`` for two (2-D), evaluated on a grid of offsets
with the operator's own whole-data-set loss (:meth:`dualhess.Operator.loss_at`). The
directions are

* by default the top eigenvectors of the operator (unit vectors from :func:`dualhess.eigsh`),
  as in PyHessian's pictures: along a unit eigenvector ``v`` with eigenvalue ``lambda`` the
  slice has curvature ``f''(0) = v^T H v = lambda``;
* or *filter-normalised* random directions (Li et al. 2018): a Gaussian direction whose every
  filter (a slice of a parameter tensor along its first axis, e.g. one output unit of a linear
  or convolutional layer) is rescaled to the norm of the same filter of ``theta``, so that
  offsets mean the same relative change in every layer, whatever its scale;
* or directions you give (native or numpy flat vectors, used as given).

References
----------
H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape of neural
nets", NeurIPS 2018, https://arxiv.org/abs/1712.09913 (filter normalisation).
Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of
the Hessian", IEEE BigData 2020, https://arxiv.org/abs/1912.07145 (slices along the top
eigenvectors).

Examples
--------
>>> import numpy as np, dualhess
>>> from dualhess._landscape import QuadraticLoss
>>> op = QuadraticLoss(np.diag([4.0, 1.0, 0.5]))
>>> land = dualhess.loss_landscape(op, radius=1.0, num_points=3, seed=0)
>>> land.values.round(6).tolist()                  # 0.5 * 4 * a**2 along the top eigenvector
[2.0, 0.0, 2.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._array import default_rng, to_numpy
from ._errors import LossUnavailableError
from ._operator import DenseOperator, Operator, ParamLayout
from ._results import Eigen, Result
from ._util import check_operator, check_positive_int, progress_bar

__all__ = ["LossLandscape", "loss_landscape", "filter_normalized_direction", "QuadraticLoss"]


@dataclasses.dataclass(frozen=True)
class LossLandscape(Result):
    """The loss on a 1-D or 2-D grid of offsets around ``theta``.

    Attributes
    ----------
    offsets : tuple of ndarray
        One array of offsets per direction (``np.linspace(-radius, radius, num_points)``).
    values : ndarray
        The loss: shape ``(num_points,)`` in 1-D; ``(num_points, num_points)`` in 2-D with
        ``values[i, j] = L(theta + offsets[0][i] d_1 + offsets[1][j] d_2)``.
    center_loss : float
        ``L(theta)``, equal to ``op.loss`` for a backend operator.
    kind : {"eigen", "random", "given"}
        Where the directions came from.
    eigenvalues : tuple of float or None
        The eigenvalue of each direction when ``kind == "eigen"``.
    direction_norms : tuple of float
        ``||d_i||`` of each direction (1 for eigenvectors).
    radius : float
    num_evaluations : int
        Whole-data-set loss evaluations spent.
    num_matvecs : int
        Operator products spent (on the eigenvectors).
    """

    offsets: tuple[np.ndarray, ...]
    values: np.ndarray
    center_loss: float
    kind: str
    eigenvalues: tuple[float, ...] | None
    direction_norms: tuple[float, ...]
    radius: float
    num_evaluations: int
    num_matvecs: int

    @property
    def ndim(self) -> int:
        """1 or 2: the number of directions."""
        return len(self.offsets)

    def curvature(self) -> np.ndarray:
        """Second differences of the slice at the centre, one per direction.

        ``(f(h) - 2 f(0) + f(-h)) / h^2`` with ``h`` the grid step, from the grid points next
        to the centre (needs an odd ``num_points``). Along a unit eigenvector this approaches
        its eigenvalue as ``h -> 0`` (error ``O(h^2)``, exact for a quadratic loss).
        """
        out = []
        for axis, grid in enumerate(self.offsets):
            if len(grid) % 2 == 0 or len(grid) < 3:
                raise ValueError("curvature() needs an odd num_points >= 3 (a grid point at 0)")
            c = len(grid) // 2
            line = self.values if self.ndim == 1 else np.take(self.values, c, axis=1 - axis)
            h = float(grid[c + 1] - grid[c])
            out.append((line[c + 1] - 2.0 * line[c] + line[c - 1]) / h**2)
        return np.array(out)

    def plot(self, path: Any = None, *, ax: Any = None, label: str | None = None,
             levels: int = 20) -> Any:
        """Draw the slice: a line (1-D) or filled contours with a colour bar (2-D).

        Parameters
        ----------
        path : path, optional
            Save the figure there.
        ax : matplotlib Axes, optional
            Draw into these axes (e.g. to overlay two 1-D slices); default a new figure.
        label : str, optional
            Legend label of the line (1-D).
        levels : int
            Contour levels (2-D).

        Returns
        -------
        matplotlib.figure.Figure
        """
        from ._plotting import plot_landscape

        return plot_landscape(self, path, ax=ax, label=label, levels=levels)


def filter_normalized_direction(
    layout: ParamLayout, params: np.ndarray, rng: Any, *, filter_axis: int = 0,
    perturb_vectors: bool = False,
) -> np.ndarray:
    """A Gaussian direction rescaled filter by filter to the norms of ``params`` (Li et al.).

    Every parameter tensor of ``layout`` with two or more dimensions is cut into filters along
    ``filter_axis`` (PyTorch's output features / channels are axis 0; Flax kernels keep them
    last, ``filter_axis=-1``), and each filter ``d_j`` of the Gaussian direction becomes
    ``d_j / ||d_j|| * ||theta_j||``. Tensors of one dimension or none (biases, normalisation
    scales) get a zero direction, as in the reference implementation's default
    (``ignore="biasbn"``), unless ``perturb_vectors`` (then each is normalised as one filter).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import ParamLayout
    >>> layout = ParamLayout.from_shapes([("w", (2, 3)), ("b", (2,))])
    >>> theta = np.array([3.0, 0.0, 4.0, 0.0, 1.0, 0.0, 7.0, 7.0])
    >>> d = filter_normalized_direction(layout, theta, np.random.default_rng(0))
    >>> np.linalg.norm(d[:6].reshape(2, 3), axis=1).round(12).tolist(), d[6:].tolist()
    ([5.0, 1.0], [0.0, 0.0])
    """
    params = np.asarray(params, dtype=np.float64)
    out = np.zeros(layout.size)
    for entry in layout:
        theta = params[entry.slice].reshape(entry.shape)
        if len(entry.shape) < 2:
            if perturb_vectors and entry.size:
                d = rng.standard_normal(entry.size)
                out[entry.slice] = d / max(np.linalg.norm(d), 1e-300) * np.linalg.norm(theta)
            continue
        d = rng.standard_normal(entry.shape)
        axis = filter_axis % len(entry.shape)
        theta_f = np.moveaxis(theta, axis, 0).reshape(entry.shape[axis], -1)
        d_f = np.moveaxis(d, axis, 0).reshape(entry.shape[axis], -1)
        scale = np.linalg.norm(theta_f, axis=1) / np.maximum(np.linalg.norm(d_f, axis=1), 1e-300)
        d_f = d_f * scale[:, None]
        moved = d_f.reshape(np.moveaxis(d, axis, 0).shape)
        out[entry.slice] = np.moveaxis(moved, 0, axis).reshape(-1)
    return out


def _parameters(op: Operator, params: Any) -> np.ndarray:
    if params is None:
        params = getattr(op, "params_flat", None)
    if params is None:
        raise LossUnavailableError(
            f"loss_landscape: filter-normalised directions need the parameters theta, and "
            f"{type(op).__name__} exposes none (op.params_flat); pass params= (a flat vector "
            "in the operator's order)"
        )
    out = np.asarray(to_numpy(params), dtype=np.float64).reshape(-1)
    if out.shape != (op.n,):
        raise ValueError(f"loss_landscape: params has {out.size} entries, the operator n={op.n}")
    return out


def _given(directions: Any, n: int, dims: int) -> list[np.ndarray]:
    if isinstance(directions, Eigen):
        if directions.vectors is None:
            raise ValueError("loss_landscape: the Eigen result has no vectors "
                             "(computed with return_vectors=False)")
        if directions.vectors.shape[1] < dims:
            raise ValueError(f"loss_landscape: dims={dims} but the Eigen result holds "
                             f"{directions.vectors.shape[1]} vector(s)")
        directions = directions.vectors[:, :dims]
    if isinstance(directions, (list, tuple)):
        vecs = [np.asarray(to_numpy(d), dtype=np.float64).reshape(-1) for d in directions]
    else:
        arr = np.asarray(to_numpy(directions), dtype=np.float64)
        vecs = [arr] if arr.ndim == 1 else [arr[:, i] for i in range(arr.shape[1])]
    if not 1 <= len(vecs) <= 2:
        raise ValueError(f"loss_landscape: give one or two directions, got {len(vecs)}")
    for v in vecs:
        if v.shape != (n,):
            raise ValueError(f"loss_landscape: a direction has shape {v.shape}, expected ({n},)")
        if not (np.all(np.isfinite(v)) and np.any(v != 0)):
            raise ValueError("loss_landscape: a direction is zero or not finite")
    return vecs


def loss_landscape(
    op: Operator,
    directions: Any = None,
    *,
    radius: float = 1.0,
    num_points: int = 21,
    dims: int = 1,
    seed: Any = 0,
    params: Any = None,
    filter_axis: int = 0,
    tol: float = 1e-8,
    progress: bool = False,
) -> LossLandscape:
    """The whole-data-set loss on a 1-D or 2-D slice through the current parameters.

    Parameters
    ----------
    op : Operator
        A curvature operator with a loss (:meth:`~dualhess.Operator.loss_at`): every backend
        operator, in either framework.
    directions : None, "eigen", "random", Eigen, array or sequence of arrays
        ``None`` / ``"eigen"`` (default): the top ``dims`` eigenvectors (unit vectors,
        :func:`dualhess.eigsh`, ``which="LA"``). ``"random"``: ``dims`` filter-normalised
        Gaussian directions (Li et al. 2018; :func:`filter_normalized_direction`, using
        ``op.layout`` and ``op.params_flat``). An :class:`~dualhess.Eigen` result: its first
        ``dims`` vectors, in its order. An ``(n,)`` or ``(n, 2)`` array, or a list of one or
        two flat vectors: used as given, in the operator's flat order.
    radius : float
        Offsets run over ``[-radius, radius]`` in units of the directions.
    num_points : int
        Grid points per direction (odd puts one at the centre; ``num_points ** 2``
        evaluations in 2-D).
    dims : int
        1 or 2: the number of directions for ``"eigen"`` and ``"random"``.
    seed : int, numpy.random.Generator or None
        For the eigensolver's start vector and the random directions.
    params : array, optional
        ``theta`` for the filter normalisation, where the operator has no ``params_flat``.
    filter_axis : int
        The filter axis of multi-dimensional parameter tensors (see
        :func:`filter_normalized_direction`).
    tol : float
        Relative residual tolerance of the eigenvectors.
    progress : bool
        A progress bar over the loss evaluations.

    Returns
    -------
    LossLandscape
        ``offsets``, ``values``, ``center_loss``, ``curvature()``, ``plot()``, ``to_dict()``.

    Raises
    ------
    LossUnavailableError
        When the operator has no loss (a plain :class:`~dualhess.DenseOperator`).

    References
    ----------
    H. Li et al., "Visualizing the loss landscape of neural nets", NeurIPS 2018,
    https://arxiv.org/abs/1712.09913.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess._landscape import QuadraticLoss
    >>> op = QuadraticLoss(np.diag([3.0, 2.0, 1.0]))
    >>> land = dualhess.loss_landscape(op, dims=2, radius=0.5, num_points=5, seed=0)
    >>> land.values.shape, land.curvature().round(8).tolist()
    ((5, 5), [3.0, 2.0])
    """
    from ._eigsh import eigsh

    op = check_operator(op, "loss_landscape")
    points = check_positive_int(num_points, "num_points", "loss_landscape")
    if points < 2:
        raise ValueError("loss_landscape: num_points must be at least 2")
    if not (isinstance(radius, (int, float)) and np.isfinite(radius) and radius > 0):
        raise ValueError(f"loss_landscape: radius must be a positive number, got {radius!r}")
    if dims not in (1, 2):
        raise ValueError(f"loss_landscape: dims must be 1 or 2, got {dims!r}")
    rng = default_rng(seed)
    zero = op.asarray(np.zeros(op.n))
    center = float(op.loss_at(zero))  # fails early, with the message, without a loss
    before = op.num_matvecs
    eigenvalues = None
    if directions is None or (isinstance(directions, str) and directions == "eigen"):
        kind = "eigen"
        if dims >= op.n:
            raise ValueError(f"loss_landscape: dims={dims} eigenvectors need n > {dims}")
        eig = eigsh(op, k=dims, which="LA", tol=tol, seed=rng, criterion="residual")
        order = np.argsort(np.asarray(eig.values))[::-1]
        eigenvalues = tuple(float(eig.values[i]) for i in order)
        host = np.asarray(to_numpy(eig.vectors), dtype=np.float64)
        vecs = [host[:, i] for i in order]
    elif isinstance(directions, str) and directions == "random":
        kind = "random"
        layout = getattr(op, "layout", None)
        if layout is None or layout.size != op.n:
            raise ValueError(
                "loss_landscape: filter-normalised directions need the operator's parameter "
                "layout (op.layout); backend operators have one"
            )
        theta = _parameters(op, params)
        vecs = [filter_normalized_direction(layout, theta, rng, filter_axis=filter_axis)
                for _ in range(dims)]
        if not all(np.any(v != 0) for v in vecs):
            raise ValueError("loss_landscape: a filter-normalised direction is zero (all "
                             "parameters are zero or one-dimensional)")
    elif isinstance(directions, str):
        raise ValueError(f"loss_landscape: directions must be None, 'eigen', 'random', an "
                         f"Eigen result or arrays, got {directions!r}")
    else:
        kind = "given"
        vecs = _given(directions, op.n, dims)
        if isinstance(directions, Eigen):
            kind = "eigen"
            eigenvalues = tuple(float(v) for v in np.asarray(directions.values)[:len(vecs)])
    spent = op.num_matvecs - before
    grid = np.linspace(-float(radius), float(radius), points)
    shape = (points,) * len(vecs)
    values = np.empty(shape)
    bar = progress_bar(progress, values.size, "landscape", unit="loss evaluations")
    try:
        for index in np.ndindex(*shape):
            offsets = [grid[i] for i in index]
            if all(o == 0.0 for o in offsets):
                values[index] = center
            else:
                delta = sum(o * v for o, v in zip(offsets, vecs))
                values[index] = float(op.loss_at(op.asarray(delta)))
            bar.update(1)
    finally:
        bar.close()
    evaluations = 1 + values.size - int(points % 2 == 1)
    return LossLandscape(
        offsets=tuple(grid.copy() for _ in vecs),
        values=values,
        center_loss=center,
        kind=kind,
        eigenvalues=eigenvalues,
        direction_norms=tuple(float(np.linalg.norm(v)) for v in vecs),
        radius=float(radius),
        num_evaluations=evaluations,
        num_matvecs=spent,
    )


class QuadraticLoss(DenseOperator):
    """A dense matrix with the quadratic loss it is the Hessian of (tests, examples).

    ``L(theta) = 1/2 theta^T A theta - b^T theta + c``: its Hessian is ``A``, its gradient
    ``A theta - b``, so every analysis built on :meth:`loss_at` and :meth:`gradient` has an
    exact answer.

    Parameters
    ----------
    matrix : array (n, n)
        The symmetric matrix ``A`` (numpy, torch or jax).
    params : array (n,), optional
        ``theta`` (default zeros), in the matrix's framework or numpy.
    linear : array (n,), optional
        ``b`` (default zeros).
    constant : float
        ``c``.
    layout : ParamLayout, optional
        A parameter layout for the flat vector.

    Examples
    --------
    >>> import numpy as np
    >>> op = QuadraticLoss(np.diag([2.0, 1.0]), params=np.array([1.0, 1.0]))
    >>> op.loss_at(np.zeros(2)), op.gradient().tolist()
    (1.5, [2.0, 1.0])
    """

    def __init__(self, matrix: Any, *, params: Any = None, linear: Any = None,
                 constant: float = 0.0, layout: ParamLayout | None = None) -> None:
        super().__init__(matrix)
        n = self.n
        self.params_flat = self.asarray(np.zeros(n) if params is None else to_numpy(params))
        self.linear = self.asarray(np.zeros(n) if linear is None else to_numpy(linear))
        self.constant = float(constant)
        self.layout = layout
        self.loss = self.loss_at(self.asarray(np.zeros(n)))

    def loss_at(self, delta: Any) -> float:
        x = self.params_flat + delta
        return float(0.5 * (x @ (self.matrix @ x)) - self.linear @ x + self.constant)

    def gradient(self) -> Any:
        return self.matrix @ self.params_flat - self.linear
