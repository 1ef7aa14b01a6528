"""The framework-neutral pipeline behind ``dualhess analyze``.

Given a model, a loss and data (or ready-made operators), build the Hessian operator in each
framework through the backend registry (:mod:`dualhess.backends`), and compute on each

- the top-``k`` eigenvalues with residuals (:func:`dualhess.eigsh`, thick-restart Lanczos),
  and the smallest eigenvalue (``which="SA"``);
- the trace: XTrace +- its standard error (Epperly, Tropp & Webber 2024), and the exact
  trace where the backend can (BackPACK for PyTorch), else ``None`` with the reason;
- the eigenvalue density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017);
- a summary: ``lambda_max``, ``lambda_min`` and the negative spectral mass;

and, when both frameworks run, the crosscheck of the two operators
(:func:`dualhess.crosscheck.crosscheck`) plus the agreement of the numbers above.

The JAX twin of a PyTorch model flattens its parameters in another order. Its operator is
wrapped in :class:`HostOperator` so that both frameworks act on vectors in the PyTorch
order: every algorithm then sees *identical* probes and start vectors on both sides, and the
two columns of the report differ only by the round-off of the two autodiff stacks. (The
wrapper also keeps the algorithms' small vector operations in numpy, where they are much
cheaper than JAX's op-by-op dispatch; the products stay jitted on the JAX device.)

Everything returned is plain JSON-able Python (dicts, lists, floats, ``None``); the report
writer (:mod:`dualhess._report`) turns it into files.

Examples
--------
>>> import numpy as np
>>> from dualhess import DenseOperator
>>> from dualhess._analysis import AnalysisSettings, run_analysis
>>> ops = {"numpy": DenseOperator(np.diag(np.arange(-2.0, 8.0)))}
>>> out = run_analysis(ops, AnalysisSettings(top_k=2, trace_matvecs=9, density_probes=2,
...                                          density_steps=5, progress=False))
>>> [round(v, 8) for v in out["results"]["numpy"]["eigenvalues"]["values"]]
[7.0, 6.0]
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._alignment import Alignment
from ._array import dtype_name, to_numpy
from ._operator import ExactUnavailableError, Operator
from ._wrappers import HostOperator

__all__ = [
    "AnalysisSettings",
    "analyze",
    "run_analysis",
    "analyze_operator",
    "resolve_params",
    "negative_mass",
    "package_versions",
    "FRAMEWORKS",
]

#: Values accepted by ``--framework``.
FRAMEWORKS = ("torch", "jax", "both")
DTYPES = ("float64", "float32")
#: Device types a ``--device`` string may name (torch's, checked here without importing it).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hip", "xla", "meta", "ipu", "hpu", "mtia", "privateuseone")
_DEVICE = re.compile(r"^([a-z_]+)(:\d+)?$")

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclasses.dataclass
class AnalysisSettings:
    """Every knob of an analysis (the CLI options map one to one onto these fields).

    Attributes
    ----------
    framework : {"torch", "jax", "both"} or None
        Which frameworks compute. ``None``: both for a PyTorch model (PyTorch and its JAX
        twin), JAX for a Flax model.
    top_k : int
        How many of the largest eigenvalues.
    trace_matvecs : int
        Budget of operator products for XTrace.
    density_probes, density_steps : int
        Stochastic Lanczos quadrature: random probes and Lanczos steps per probe.
    seed : int
        Seeds every random draw (probes are numpy float64, identical in both frameworks).
    dtype : {"float64", "float32"}
    device : str or None
        Device of the PyTorch side (e.g. ``"cuda"``); JAX uses its default device.
    params : str or None
        A parameter block: comma-separated parameter names or name prefixes.
    eig_tol : float or None
        The eigensolver's tolerance: a bound on each eigenvalue's error relative to the largest
        ``|lambda|`` (:func:`dualhess.eigsh`, ``criterion="eigenvalue"``); default 1e-10
        (float64) / 1e-5 (float32).
    crosscheck_probes : int
        Probes of the crosscheck when both frameworks run.
    progress : bool
        Progress bars on the long steps.
    landscape : bool
        Also evaluate the loss along the top eigenvector (:func:`dualhess.loss_landscape`).
    landscape_radius : float
        Offsets ``[-radius, radius]`` along the unit top eigenvector.
    landscape_points : int
        Points of the slice (odd: one at the centre).
    """

    framework: str | None = None
    top_k: int = 5
    trace_matvecs: int = 100
    density_probes: int = 10
    density_steps: int = 60
    seed: int = 0
    dtype: str = "float64"
    device: str | None = None
    params: str | None = None
    eig_tol: float | None = None
    crosscheck_probes: int = 8
    progress: bool = True
    landscape: bool = False
    landscape_radius: float = 1.0
    landscape_points: int = 21

    def validate(self) -> AnalysisSettings:
        """Check every field; raise ``ValueError`` with the option name on bad values."""
        if self.framework is not None and self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("top_k", "trace_matvecs", "density_probes", "density_steps", "crosscheck_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.density_steps < 2:
            raise ValueError("--density-steps must be at least 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.eig_tol is not None and not (0 < self.eig_tol < 1):
            raise ValueError(f"eig_tol must be in (0, 1), got {self.eig_tol!r}")
        if self.device is not None:
            match = _DEVICE.match(str(self.device).strip())
            if not isinstance(self.device, str) or match is None or match.group(1) not in DEVICE_TYPES:
                raise ValueError(
                    f"--device must be a device type with an optional index ({', '.join(DEVICE_TYPES[:4])}"
                    f", ... e.g. cuda:1), got {self.device!r}"
                )
        if self.params is not None and not self.params.strip(" ,"):
            raise ValueError("--params is empty; give parameter names or prefixes, comma-separated")
        if not (isinstance(self.landscape_radius, (int, float)) and self.landscape_radius > 0
                and np.isfinite(self.landscape_radius)):
            raise ValueError(f"--landscape-radius must be a positive number, got "
                             f"{self.landscape_radius!r}")
        points = self.landscape_points
        if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 3:
            raise ValueError(f"--landscape-points must be an integer >= 3, got {points!r}")
        return self

    @property
    def tolerance(self) -> float:
        """The eigensolver's tolerance (a relative bound on the eigenvalue errors)."""
        if self.eig_tol is not None:
            return float(self.eig_tol)
        return 1e-10 if self.dtype == "float64" else 1e-5

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eig_tol"] = self.tolerance
        return out


# ---------------------------------------------------------------------- helpers
def _device_unavailable(exc: BaseException) -> bool:
    """Whether a framework's error says that the requested device does not exist here."""
    text = str(exc).lower()
    return any(key in text for key in ("not compiled with", "device", "no cuda gpus", "cuda driver",
                                       "mps backend", "not available"))


def resolve_params(spec: str | None, names: Sequence[str]) -> list[str] | None:
    """Turn ``--params`` into the list of parameter names it selects, in layout order.

    Each comma-separated token selects the parameter of that exact name, or else every
    parameter whose name starts with it (a prefix such as ``conv1`` or ``params.Dense_0``).

    Examples
    --------
    >>> resolve_params("conv1", ["conv1.weight", "conv1.bias", "fc.weight"])
    ['conv1.weight', 'conv1.bias']
    >>> resolve_params("fc.weight,conv1.bias", ["conv1.weight", "conv1.bias", "fc.weight"])
    ['conv1.bias', 'fc.weight']
    """
    if spec is None:
        return None
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ValueError("--params is empty; give parameter names or prefixes, comma-separated")
    chosen: set[str] = set()
    for token in tokens:
        exact = [n for n in names if n == token]
        hits = exact or [n for n in names if n.startswith(token)]
        if not hits:
            raise ValueError(
                f"--params: {token!r} matches no parameter; the model has: {', '.join(names)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


#: Eigenvalues below ``-this * max|lambda|`` count as negative spectral mass.
NEGATIVE_MASS_RELATIVE_THRESHOLD = 1e-3


def negative_mass(nodes: Any, weights: Any, threshold: float = 0.0) -> float:
    """The spectral mass below ``-threshold``: the mean over probes of the quadrature
    weights of the nodes (Ritz values) below ``-threshold``.

    Examples
    --------
    >>> negative_mass([[-1.0, 2.0], [-3.0, 4.0]], [[0.25, 0.75], [0.5, 0.5]])
    0.375
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes {nodes.shape} and weights {weights.shape} differ in shape")
    return float(np.mean(np.sum(np.where(nodes < -threshold, weights, 0.0), axis=1)))


def package_versions() -> dict[str, str | None]:
    """Versions of python, numpy, dualhess and, when installed, the frameworks (read from the
    package metadata: nothing is imported)."""
    from . import __version__

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dualhess": __version__,
    }
    from .backends import backend_distributions

    for dist in ("scipy", *backend_distributions(), "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------- one operator
def _reason(message: str) -> str:
    """The reason of an error message without its advice: the first line, up to the first
    sentence or clause that tells the API user what to call instead."""
    line = message.strip().splitlines()[0] if message.strip() else message
    for mark in ("; use ", "; pass ", ". Use ", ". Pass ", "; call "):
        line = line.split(mark)[0]
    return line.rstrip(" .;")


def analyze_operator(
    op: Operator, settings: AnalysisSettings, *, label: str = "", log: Log = _quiet
) -> dict[str, Any]:
    """Eigenvalues, trace, density and summary of one operator, as a plain dict.

    See :data:`dualhess._report.SCHEMA` (``results.<framework>.*``) for the keys.
    """
    from ._density import density
    from ._eigsh import eigsh
    from ._trace import trace

    settings.validate()
    if settings.top_k >= op.n:
        raise ValueError(f"--top-k must be < n = {op.n} (the number of parameters), got {settings.top_k}")
    progress = settings.progress
    prefix = f"[{label}] " if label else ""
    timings: dict[str, float] = {}
    start_count = op.num_matvecs
    counts: dict[str, int] = {}

    def step(name: str, what: str, fn: Callable[[], Any]) -> Any:
        log(f"{prefix}{what}")
        before = op.num_matvecs
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        counts[name] = op.num_matvecs - before
        return out

    tol = settings.tolerance
    top = step(
        "eigsh",
        f"top-{settings.top_k} eigenvalues (thick-restart Lanczos, tol {tol:.0e})",
        lambda: eigsh(op, k=settings.top_k, which="LA", tol=tol, seed=settings.seed,
                      progress=progress),
    )
    bottom = step(
        "eigsh_min",
        "smallest eigenvalue",
        lambda: eigsh(op, k=1, which="SA", tol=tol, seed=settings.seed, return_vectors=False,
                      progress=progress),
    )
    est = step(
        "trace",
        f"trace (XTrace, {settings.trace_matvecs} products)",
        lambda: trace(op, method="xtrace", num_matvecs=settings.trace_matvecs,
                      seed=settings.seed, progress=progress),
    )

    def exact() -> tuple[float | None, str | None]:
        try:
            return float(op.exact_trace()), None
        except ExactUnavailableError as exc:
            return None, _reason(str(exc))
        except Exception as exc:  # a backend failure must not lose the other numbers
            return None, _reason(f"{type(exc).__name__}: {exc}")

    exact_value, exact_reason = step("exact_trace", "exact trace", exact)
    dens = step(
        "density",
        f"spectral density (SLQ, {settings.density_probes} probes x {settings.density_steps} steps)",
        lambda: density(op, num_probes=settings.density_probes,
                        num_steps=min(settings.density_steps, op.n), seed=settings.seed,
                        progress=progress),
    )

    values = np.asarray(top.values, dtype=np.float64)
    order = np.argsort(values)[::-1]
    vectors = np.asarray(to_numpy(top.vectors), dtype=np.float64)[:, order]
    # One sign for every framework: the entry of largest magnitude is positive.
    vectors = vectors * np.where(vectors[np.argmax(np.abs(vectors), axis=0),
                                         np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    overlap = step("gradient_overlap", f"gradient overlap with the top-{settings.top_k} "
                   "eigenspace", lambda: _gradient_overlap(op, vectors, values[order]))
    landscape = None
    if settings.landscape:
        landscape = step(
            "landscape",
            f"loss along the top eigenvector ({settings.landscape_points} points in "
            f"[-{settings.landscape_radius:g}, {settings.landscape_radius:g}])",
            lambda: _landscape(op, vectors[:, 0], float(values[order[0]]), settings),
        )
    nodes = np.asarray(dens.nodes, dtype=np.float64)
    weights = np.asarray(dens.weights, dtype=np.float64)
    lam_max = float(values[order[0]])
    lam_min = float(np.asarray(bottom.values, dtype=np.float64)[0])
    scale = max(abs(lam_max), abs(lam_min), float(np.max(np.abs(nodes))) if nodes.size else 0.0)
    # Network Hessians carry a large cluster of (near-)zero eigenvalues. With a few dozen
    # Lanczos steps the Gauss quadrature represents that cluster by Ritz values that can sit
    # a little below zero with the cluster's whole weight, so "mass below 0" from the nodes
    # is not resolvable. Negative mass counts eigenvalues below -1e-3 * max|lambda| (measured
    # on the demo CNN against its dense spectrum: SLQ 0.037 vs exact 0.040 at this threshold,
    # but 0.80 vs 0.058 at sqrt(eps) * max|lambda|).
    threshold = NEGATIVE_MASS_RELATIVE_THRESHOLD * scale
    dens_dict = dens.to_dict()
    return {
        "framework": label or op.framework,
        "n": int(op.n),
        "dtype": dtype_name(op.dtype),
        "method": getattr(op, "method", None),
        "eigenvalues": {
            "which": "LA",
            "values": values[order].tolist(),
            "residuals": np.asarray(top.residuals, dtype=np.float64)[order].tolist(),
            "converged": [bool(c) for c in np.asarray(top.converged)[order]],
            "tol": tol,
            "num_matvecs": int(top.num_matvecs),
        },
        "lambda_min": {
            "value": lam_min,
            "residual": float(np.asarray(bottom.residuals)[0]),
            "converged": bool(np.asarray(bottom.converged)[0]),
            "num_matvecs": int(bottom.num_matvecs),
        },
        "trace": {
            "xtrace": {
                "value": float(est.value),
                "stderr": float(est.stderr),
                "num_matvecs": int(est.num_matvecs),
            },
            "exact": {"value": exact_value, "reason": exact_reason},
        },
        "density": {
            "grid": np.asarray(dens_dict["grid"], dtype=np.float64).tolist(),
            "values": np.asarray(dens_dict["values"], dtype=np.float64).tolist(),
            "nodes": nodes.tolist(),
            "weights": weights.tolist(),
            "sigma": float(dens.sigma),
            "num_probes": int(settings.density_probes),
            "num_steps": int(nodes.shape[-1]) if nodes.size else 0,
            "num_matvecs": int(dens.num_matvecs),
        },
        "gradient_overlap": overlap,
        "landscape": landscape,
        "summary": {
            "lambda_max": lam_max,
            "lambda_min": lam_min,
            "negative_mass": negative_mass(nodes, weights, threshold),
            "negative_mass_threshold": threshold,
            "trace": float(est.value) if exact_value is None else exact_value,
        },
        "timings": {k: round(v, 6) for k, v in timings.items()},
        "num_matvecs": {**counts, "total": int(op.num_matvecs - start_count)},
    }


def _gradient_overlap(op: Operator, vectors: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """The report's gradient overlap: ``||P_k g||^2 / ||g||^2`` with the top-k vectors."""
    from ._errors import LossUnavailableError
    from ._overlap import overlap_of

    try:
        g = op.gradient()
    except LossUnavailableError as exc:
        return {"value": None, "reason": str(exc)}
    value, parts = overlap_of(g, vectors)
    return {"value": value, "k": int(vectors.shape[1]), "per_direction": parts.tolist(),
            "eigenvalues": values.tolist(),
            "gradient_norm": float(np.linalg.norm(np.asarray(to_numpy(g), dtype=np.float64))),
            "reason": None}


def _landscape(op: Operator, vector: np.ndarray, value: float,
               settings: AnalysisSettings) -> dict[str, Any]:
    """The report's 1-D slice along the (sign-fixed) top eigenvector."""
    from ._errors import LossUnavailableError
    from ._landscape import loss_landscape
    from ._results import Eigen

    top = Eigen(values=np.array([value]), vectors=vector[:, None], residuals=np.zeros(1),
                converged=np.ones(1, dtype=bool), num_matvecs=0, which="LA", tol=0.0)
    try:
        land = loss_landscape(op, top, radius=settings.landscape_radius,
                              num_points=settings.landscape_points, progress=settings.progress)
    except LossUnavailableError as exc:
        return {"values": None, "reason": str(exc)}
    out = land.to_dict()
    out["curvature"] = float(land.curvature()[0]) if settings.landscape_points % 2 else None
    out["reason"] = None
    return out


def _agreement(results: dict[str, dict[str, Any]], labels: tuple[str, str], rtol: float) -> dict[str, Any]:
    """How far the two frameworks' numbers are apart (same probes on both sides)."""
    a, b = (results[x] for x in labels)
    va = np.asarray(a["eigenvalues"]["values"])
    vb = np.asarray(b["eigenvalues"]["values"])
    lam = float(max(np.max(np.abs(va)), np.max(np.abs(vb)), np.finfo(float).tiny))
    eig_diff = float(np.max(np.abs(va - vb)))
    # |theta - lambda| <= ||r|| for each Ritz pair, plus Weyl: rtol * ||H|| for the operators.
    bound = float(np.max(a["eigenvalues"]["residuals"]) + np.max(b["eigenvalues"]["residuals"])
                  + rtol * lam)
    ta, tb = a["trace"]["xtrace"]["value"], b["trace"]["xtrace"]["value"]
    ga = np.asarray(a["density"]["values"])
    gb = np.asarray(b["density"]["values"])
    dens_diff = float(np.max(np.abs(ga - gb))) if ga.shape == gb.shape else None
    return {
        "labels": list(labels),
        "rtol": rtol,
        "eigenvalues_max_abs_diff": eig_diff,
        "eigenvalues_max_rel_diff": eig_diff / lam,
        "eigenvalues_bound": bound,
        "eigenvalues_agree": eig_diff <= bound,
        "lambda_min_abs_diff": abs(a["summary"]["lambda_min"] - b["summary"]["lambda_min"]),
        "trace_abs_diff": abs(ta - tb),
        "trace_rel_diff": abs(ta - tb) / max(abs(ta), abs(tb), np.finfo(float).tiny),
        "density_max_abs_diff": dens_diff,
        "negative_mass_diff": abs(a["summary"]["negative_mass"] - b["summary"]["negative_mass"]),
        "gradient_overlap_diff": _difference(a["gradient_overlap"].get("value"),
                                             b["gradient_overlap"].get("value")),
        "landscape_max_abs_diff": _difference((a.get("landscape") or {}).get("values"),
                                              (b.get("landscape") or {}).get("values")),
    }


def _difference(x: Any, y: Any) -> float | None:
    """``max |x - y|`` of two numbers or equally shaped lists; None when either is missing."""
    if x is None or y is None:
        return None
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(x - y))) if x.shape == y.shape else None


# ---------------------------------------------------------------------- several operators
def run_analysis(
    operators: dict[str, Operator],
    settings: AnalysisSettings,
    *,
    alignment: Alignment | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Analyse one or two operators of the same matrix (already in the same flat order).

    Parameters
    ----------
    operators : dict
        ``{label: Operator}``, one or two entries; with two, they are crosschecked.
    settings : AnalysisSettings
    alignment : Alignment, optional
        Only its ``blocks`` are used (names of the parameter tensors for the per-block
        crosscheck); the operators must already act in the same order.
    log : callable, optional
        Receives one line per step (the CLI prints them).

    Returns
    -------
    dict
        ``frameworks``, ``results`` (one dict per label, see :func:`analyze_operator`),
        ``crosscheck`` and ``agreement`` (``None`` with a single operator), ``timings``.
    """
    settings.validate()
    if not 1 <= len(operators) <= 2:
        raise ValueError(f"run_analysis takes one or two operators, got {len(operators)}")
    labels = tuple(operators)
    ns = {op.n for op in operators.values()}
    if len(ns) != 1:
        raise ValueError(f"the operators have different sizes: {sorted(ns)}")
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for label, op in operators.items():
        t0 = time.perf_counter()
        results[label] = analyze_operator(op, settings, label=label, log=log)
        timings[label] = time.perf_counter() - t0
    cross = agreement = None
    if len(labels) == 2:
        from ._crosscheck import crosscheck, default_rtol

        op_a, op_b = (operators[x] for x in labels)
        n = op_a.n
        blocks = alignment.blocks if alignment is not None else None
        log(f"crosscheck {labels[0]} vs {labels[1]} ({settings.crosscheck_probes} shared probes)")
        t0 = time.perf_counter()
        # k=0: the eigenvalues were computed above from identical start vectors on both
        # sides; their agreement is in ``agreement``.
        report = crosscheck(op_a, op_b, align=Alignment.identity(n, blocks), k=0,
                            num_probes=settings.crosscheck_probes, seed=settings.seed,
                            labels=labels, progress=settings.progress)
        timings["crosscheck"] = time.perf_counter() - t0
        cross = report.to_dict()
        cross["summary"] = str(report)
        agreement = _agreement(results, labels, default_rtol(op_a, op_b))
        agreement["passed"] = bool(report.passed and agreement["eigenvalues_agree"])
    return {
        "frameworks": list(labels),
        "results": results,
        "crosscheck": cross,
        "agreement": agreement,
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }


# ---------------------------------------------------------------------- models
def _sides(owner: Any, twins: list[Any], requested: str | None) -> tuple[bool, list[Any]]:
    """Whether the owner's backend computes, and which twin backends do, for ``--framework``.

    ``None``: the owner and every twin backend that can take the model; ``"both"``: the same,
    an error without a twin; a backend's name: that backend alone.
    """
    if requested is None or requested == "both":
        return True, twins
    if requested == owner.name:
        return True, []
    chosen = [b for b in twins if b.name == requested]
    if not chosen:
        raise ValueError(
            f"--framework {requested}: this {owner.name} model is analysed by its own backend"
            f" ({owner.name}){' and by a twin in ' + ', '.join(b.name for b in twins) if twins else ''}"
            f"; use --framework {owner.name}"
        )
    return False, chosen


def analyze(
    model: Any,
    loss_fn: Any,
    data: Any,
    settings: AnalysisSettings | None = None,
    *,
    log: Log = _quiet,
    closure: Callable[[Any, Any], Any] | None = None,
    normalizer: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """The whole analysis of a model: build the operators, then :func:`run_analysis`.

    A PyTorch model is analysed in PyTorch and, through its Flax/JAX twin with identical
    weights, in JAX (``settings.framework``); a Flax model (an ``nnx.Module`` or a linen
    ``(module, variables)`` pair) in JAX.

    Parameters
    ----------
    model, loss_fn, data
        As for :func:`dualhess.backends.hessian`.
    settings : AnalysisSettings, optional
    log : callable, optional
        Receives one line per step.
    closure, normalizer : callable, optional
        A PyTorch model's loss as ``closure(model, batch)`` (``loss_fn`` then ``None``) and
        what each batch's loss divides by, as for :func:`torch_backend.hessian`. Such a model
        is analysed in PyTorch only: the JAX twin follows ``loss_fn(outputs, targets)``.

    Returns
    -------
    dict
        The :func:`run_analysis` dict plus ``model`` (framework, number of parameters, the
        parameter block) and ``timings.build_<framework>``.

    Examples
    --------
    >>> import torch  # doctest: +SKIP
    >>> from dualhess._analysis import analyze, AnalysisSettings  # doctest: +SKIP
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))  # doctest: +SKIP
    >>> data = (torch.randn(32, 4), torch.randint(0, 2, (32,)))  # doctest: +SKIP
    >>> out = analyze(model, torch.nn.CrossEntropyLoss(), data, AnalysisSettings(top_k=2))  # doctest: +SKIP
    >>> out["results"]["torch"]["summary"]["lambda_max"]  # doctest: +SKIP
    """
    from .backends import backend_for, get_backend, known_backends

    settings = (settings or AnalysisSettings()).validate()
    owner = backend_for(model)
    # Twin backends that can take this model; a backend whose framework is not installed
    # cannot build one (and is named in the report when it was asked for by default).
    twins, missing = [], []
    for name in known_backends():
        try:
            backend = get_backend(name)
        except ImportError as exc:
            missing.append((name, exc))
            continue
        if backend is not owner and backend.can_twin(model):
            twins.append(backend)
    for name, exc in missing:
        if settings.framework == name or (settings.framework == "both" and not twins):
            raise exc  # asked for a framework that is not installed: the pip command
    if settings.framework == "both" and not twins:
        raise ValueError(
            f"--framework both: no installed backend builds a twin of this {owner.name} model "
            f"({type(model).__name__}); use --framework {owner.name}"
        )
    loss_options = {k: v for k, v in (("closure", closure), ("normalizer", normalizer))
                    if v is not None}
    if closure is not None and not owner.accepts_closure:
        raise ValueError(
            f"closure=: a {owner.name} model's loss is loss(outputs, targets) (a model file "
            "defines loss()); closure(model, batch) is for PyTorch models"
        )
    own_side, twins = _sides(owner, twins, settings.framework)
    frameworks = ([owner.name] if own_side else []) + [b.name for b in twins]
    options: dict[str, Any] = {"dtype": settings.dtype, **loss_options}
    selected = resolve_params(settings.params, owner.parameter_names(model))
    timings: dict[str, float] = {}
    operators: dict[str, Operator] = {}
    alignment = None
    twin_error: str | None = None
    absent = [name for name, _ in missing if name in owner.twinned_by]
    if settings.framework is None and not twins and absent:
        # The default is both frameworks: a PyTorch model analysed alone because JAX is not
        # installed says so (table, stderr, report.md, report.json), never a silent null.
        name = absent[0]
        twin_error = f"{name.upper()} not installed (pip install 'dualhess[{name}]')"
        log(f"[{name}] skipped: {twin_error}; the {owner.name} analysis goes on without the "
            "crosscheck")
    if own_side:
        log(f"[{owner.name}] building the Hessian operator")
        t0 = time.perf_counter()
        extra = {} if settings.device is None else {"device": settings.device}
        try:
            op = owner.hessian(model, loss_fn, data, params=selected, **options, **extra)
        except (RuntimeError, AssertionError) as exc:
            if settings.device is None or not _device_unavailable(exc):
                raise
            raise ValueError(
                f"--device {settings.device!r} is not available on this machine "
                f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                "pass --device cpu, or a device this machine has"
            ) from exc
        # Products whose arrays compile per shape keep the algorithms' vector work on the host.
        operators[owner.name] = HostOperator(op) if getattr(op, "fixed_shapes", False) else op
        timings[f"build_{owner.name}"] = time.perf_counter() - t0
    for twin in twins:
        log(f"[{twin.name}] building the twin and its Hessian operator")
        t0 = time.perf_counter()
        try:
            if closure is not None:
                raise NotImplementedError(
                    "a closure(model, batch) loss has no twin: the JAX twin is exported "
                    "from model(inputs) and loss(outputs, targets) (define loss() to "
                    "crosscheck)")
            twin_op, alignment = twin.twin_hessian(
                model, loss_fn, data, dtype=settings.dtype, params=selected,
                normalizers=owner.normalizers(model, loss_fn, data, dtype=settings.dtype))
        except (NotImplementedError, ImportError) as exc:
            # An operation the twin cannot reproduce. Asked for explicitly (--framework
            # both/<twin>), that is an error; by default the owner's analysis goes on and
            # the report says why there is no twin.
            if settings.framework is not None:
                raise
            twin_error = f"{type(exc).__name__}: {exc}"
            log(f"[{twin.name}] skipped: {twin_error}\n      The {owner.name} analysis goes on "
                f"without the crosscheck (--framework {owner.name} skips the twin; "
                "--framework both makes this an error).")
            frameworks.remove(twin.name)
        else:
            # The twin's vectors are presented in the owner's flat order, on the host, so
            # both sides see identical probes.
            operators[twin.name] = HostOperator(twin_op, alignment)
            timings[f"build_{twin.name}"] = time.perf_counter() - t0
    first = next(iter(operators.values()))
    layout = getattr(first, "layout", None)
    if alignment is None and layout is not None:
        alignment = Alignment.identity(
            first.n, [(e.name, np.arange(e.start, e.stop)) for e in layout.entries])
    out = run_analysis(operators, settings, alignment=alignment, log=log)
    out["timings"].update({k: round(v, 6) for k, v in timings.items()})
    out["model"] = {
        "framework": owner.name,
        "type": type(model).__name__ if not isinstance(model, tuple) else type(model[0]).__name__,
        "num_params": int(first.n),
        "params": selected,
        "layout": layout.to_dict() if layout is not None else None,
        "twin_error": twin_error,
        **_dtype_note(model, settings.dtype),
    }
    return out


def _model_dtype(model: Any) -> str | None:
    """The dtype of the model's first floating parameter, by duck typing (no framework
    import): a torch module's ``parameters()``, a linen pair's variables; else ``None``."""
    leaves: list[Any] = []
    if hasattr(model, "parameters") and callable(model.parameters):
        try:
            leaves = list(model.parameters())
        except Exception:  # an nnx Module or another object with a parameters attribute
            leaves = []
    elif isinstance(model, tuple) and len(model) == 2:
        stack = [model[1]]
        while stack and len(leaves) < 64:
            node = stack.pop()
            if isinstance(node, dict) or hasattr(node, "items"):
                stack.extend(reversed(list(dict(node).values())))
            elif hasattr(node, "dtype"):
                leaves.append(node)
    for leaf in leaves:
        name = str(getattr(leaf, "dtype", "")).replace("torch.", "")
        if "float" in name:
            return name
    return None


def _dtype_note(model: Any, dtype: str) -> dict[str, str | None]:
    """``dtype`` (the model's own) and ``dtype_note`` when the analysis used another."""
    own = _model_dtype(model)
    note = None
    if own is not None and own != dtype:
        note = (f"the {own} model was analysed as a {dtype} copy (--dtype {dtype}); its own "
                f"weights are unchanged. --dtype {own} analyses it in its own precision")
    return {"dtype": own, "dtype_note": note}
