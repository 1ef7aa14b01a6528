"""The CPU benchmark suite: dualhess against its anchors, written to JSON and a markdown table.

Run it with ``python -m benchmarks.run --suite cpu`` (see ``benchmarks/README.md``). Every tool
runs on the same float64 model and data; each row records the value, the relative error
against the exact dense Hessian, the number of Hessian-vector products, the operator calls,
the median wall time over repeats, and the wall-time ratio to dualhess on the same task.
An anchor that raises is recorded as ``failed`` with its error message, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import anchors
from .models import Task, build_task, jax_twin
from .reference import Reference, reference

__all__ = ["Config", "CPU", "SMOKE", "run_suite", "write_results", "markdown", "main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one suite run (the full CPU suite, or the smoke test's tiny one)."""

    name: str = "cpu"
    batch: int = 512
    models: tuple[str, ...] = ("mlp", "cnn")
    timing_model: str | None = "mlp_large"
    sizes: dict[str, tuple[int, ...]] | None = None
    k: int = 5
    eig_tol: float = 1e-8
    pyhessian_tol: float = 1e-3
    trace_matvecs: int = 100
    trace_seeds: int = 10
    diagonal_matvecs: int = 100
    density_steps: int = 100
    density_probes: tuple[int, ...] = (1, 10)
    repeats: int = 3
    timing_repeats: int = 1
    hvp_repeats: int = 20
    jax: bool = True
    tools: tuple[str, ...] = ("pyhessian", "curvlinops", "hessian-eigenthings", "backpack", "scipy")


CPU = Config()

#: Tiny sizes for the smoke test: the same code path in a few seconds.
SMOKE = Config(
    name="smoke",
    batch=16,
    models=("mlp",),
    timing_model=None,
    sizes={"mlp": (64, 3, 10)},
    k=2,
    pyhessian_tol=1e-2,
    trace_matvecs=10,
    trace_seeds=2,
    diagonal_matvecs=10,
    density_steps=5,
    density_probes=(1, 2),
    repeats=1,
    hvp_repeats=1,
    jax=False,
)


@dataclasses.dataclass
class Row:
    """One tool on one task of one model."""

    model: str
    task: str
    tool: str
    status: str = "ok"  # ok | failed | skipped
    value: Any = None
    rel_error: float | None = None
    num_matvecs: int | None = None
    operator_calls: int | None = None
    wall_s: float | None = None
    ratio_to_dualhess: float | None = None
    note: str = ""


# ---------------------------------------------------------------------- measurement helpers
def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``(result of the first call, median wall time over repeats)``."""
    times, result = [], None
    for i in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if i == 0:
            result = out
    return result, statistics.median(times)


def measure(rows: list[Row], model: str, task: str, tool: str, fn: Callable[[], Any],
            repeats: int, error: Callable[[Any], float] | None, value: Callable[[Any], Any],
            note: str = "") -> Row:
    """Run ``fn() -> (result, num_matvecs, operator_calls)`` and append a :class:`Row`."""
    row = Row(model, task, tool, note=note)
    try:
        (result, matvecs, calls), wall = timed(fn, repeats)
        row.value = value(result)
        row.rel_error = None if error is None else float(error(result))
        row.num_matvecs, row.operator_calls, row.wall_s = int(matvecs), int(calls), wall
    except Exception as exc:  # an anchor failing is a result, recorded with its message
        row.status = "failed"
        row.note = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]  # one line
    rows.append(row)
    return row


def skipped(rows: list[Row], model: str, task: str, tool: str) -> None:
    rows.append(Row(model, task, tool, status="skipped",
                    note=f"{anchors.PACKAGES[tool]} is not installed"))


def relative(a: Any, b: Any) -> float:
    """``max |a - b| / |b|`` elementwise for vectors of eigenvalues, ``|a - b| / |b|`` for scalars."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def relative_norm(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def wasserstein(grid: np.ndarray, values: np.ndarray, eigenvalues: np.ndarray) -> float:
    """W1 distance between a density on a grid and the exact spectral measure, over the width.

    ``W1 = int |F(x) - F*(x)| dx`` with ``F`` the CDF of the (normalised) density and ``F*``
    the exact eigenvalue CDF; divided by ``lambda_max - lambda_min`` so it is scale-free.
    """
    grid, values = np.asarray(grid, dtype=np.float64), np.asarray(values, dtype=np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (values[1:] + values[:-1]) * np.diff(grid))])
    if not np.isfinite(cdf[-1]) or cdf[-1] <= 0:
        raise ValueError("the density does not integrate to a positive finite number")
    cdf /= cdf[-1]
    lo, hi = min(grid[0], eigenvalues[0]), max(grid[-1], eigenvalues[-1])
    x = np.linspace(lo, hi, 200_001)
    tool = np.interp(x, grid, cdf, left=0.0, right=1.0)
    exact = np.searchsorted(eigenvalues, x, side="right") / eigenvalues.size
    return float(np.sum(np.abs(tool - exact)) * (x[1] - x[0]) / (eigenvalues[-1] - eigenvalues[0]))


def discrete_density(nodes: np.ndarray, weights: np.ndarray, eigenvalues: np.ndarray) -> float:
    """:func:`wasserstein` for a raw quadrature (nodes and weights per probe), unbroadened."""
    nodes, weights = np.asarray(nodes, float).reshape(-1), np.asarray(weights, float).reshape(-1)
    order = np.argsort(nodes)
    nodes, weights = nodes[order], np.cumsum(weights[order]) / np.sum(weights)
    lo, hi = min(nodes[0], eigenvalues[0]), max(nodes[-1], eigenvalues[-1])
    x = np.linspace(lo, hi, 200_001)
    idx = np.searchsorted(nodes, x, side="right")
    tool = np.where(idx > 0, weights[np.maximum(idx - 1, 0)], 0.0)
    exact = np.searchsorted(eigenvalues, x, side="right") / eigenvalues.size
    return float(np.sum(np.abs(tool - exact)) * (x[1] - x[0]) / (eigenvalues[-1] - eigenvalues[0]))


class CallCounter:
    """Counts calls of ``op.matvec``/``op.matmat`` on a dualhess operator (instance wrappers)."""

    def __init__(self, op: Any) -> None:
        self.calls = 0
        for name in ("matvec", "matmat"):
            original = getattr(op, name)

            def wrapped(x: Any, _original: Callable[[Any], Any] = original) -> Any:
                self.calls += 1
                return _original(x)

            setattr(op, name, wrapped)


# ---------------------------------------------------------------------- dualhess
def dualhess_operator(task: Task, method: str = "auto") -> Any:
    import torch_backend

    return torch_backend.hessian(task.model, task.loss_fn, task.data, method=method,
                                 check_deterministic=False)


def dualhess_run(op: Any, fn: Callable[[Any], Any]) -> Callable[[], Any]:
    """Wrap ``fn(op)`` so it returns ``(result, products, operator calls)`` of that call."""

    counter = CallCounter(op)

    def run() -> Any:
        counter.calls = 0
        start = op.num_matvecs
        result = fn(op)
        return result, op.num_matvecs - start, counter.calls

    return run


# ---------------------------------------------------------------------- the suite
def bench_model(task: Task, ref: Reference | None, cfg: Config, rows: list[Row],
                extra: dict[str, Any]) -> None:
    """All tasks on one model (``ref=None``: timing only, no errors)."""
    from dualhess._density import density
    from dualhess._diagonal import diagonal
    from dualhess._eigsh import eigsh
    from dualhess._trace import trace

    name, k, reps = task.name, cfg.k, cfg.repeats if ref is not None else cfg.timing_repeats
    have = {tool: tool in cfg.tools and anchors.available(tool) for tool in anchors.PACKAGES}
    op = dualhess_operator(task)
    extra.setdefault("operators", {})[name] = {"n": task.n, "method": op.method,
                                                "auto_timings": getattr(op, "method_timings", {})}

    def err(f: Callable[[Any], float]) -> Callable[[Any], float] | None:
        return None if ref is None else f

    # ---- top-k eigenvalues
    top = None if ref is None else ref.top(k)
    e_top = err(lambda v: relative(v, top))
    values = lambda v: [float(x) for x in v]  # noqa: E731
    measure(rows, name, f"top-{k}", "dualhess",
            dualhess_run(op, lambda o: eigsh(o, k, which="LA", tol=cfg.eig_tol, seed=0,
                                             return_vectors=False).values),
            reps, e_top, values, note=f"eigsh tol={cfg.eig_tol:g}")
    for tool, fn, note in (
        ("scipy", lambda: anchors.scipy_top(task, k, cfg.eig_tol), f"ARPACK tol={cfg.eig_tol:g}"),
        ("curvlinops", lambda: anchors.curvlinops_top(task, k, cfg.eig_tol),
         f"scipy eigsh on to_scipy(), tol={cfg.eig_tol:g}"),
        ("hessian-eigenthings", lambda: anchors.eigenthings_top(task, k, cfg.eig_tol),
         "lanczos(max_iter=50)"),
        ("pyhessian", lambda: anchors.pyhessian_top(task, k, cfg.pyhessian_tol),
         f"power iteration tol={cfg.pyhessian_tol:g}"),
    ):
        if have[tool]:
            measure(rows, name, f"top-{k}", tool, fn, reps, e_top, values, note)
        else:
            skipped(rows, name, f"top-{k}", tool)

    # ---- trace
    exact_trace = None if ref is None else ref.trace
    e_trace = err(lambda t: relative(t, exact_trace))
    m = cfg.trace_matvecs
    measure(rows, name, "trace", "dualhess",
            dualhess_run(op, lambda o: trace(o, method="xtrace", num_matvecs=m, seed=0).value),
            reps, e_trace, float, note=f"xtrace, {m} matvecs")
    for tool, fn, note in (
        ("pyhessian", lambda: anchors.pyhessian_trace(task, m), f"Hutchinson, {m} probes"),
        ("hessian-eigenthings", lambda: anchors.eigenthings_trace(task, m), f"hutch++, {m}"),
        ("curvlinops", lambda: anchors.curvlinops_trace(task, m), f"xtrace, {m}"),
        ("backpack", lambda: (lambda d: (float(np.sum(d[0])), 0, 0))(anchors.backpack_diagonal(task)),
         "exact: sum of DiagHessian"),
    ):
        if have[tool]:
            measure(rows, name, "trace", tool, fn, reps, e_trace, float, note)
        else:
            skipped(rows, name, "trace", tool)
    if ref is not None:
        errors = []
        for seed in range(cfg.trace_seeds):
            estimate = trace(op, method="xtrace", num_matvecs=m, seed=seed).value
            errors.append(relative(estimate, exact_trace))
        extra.setdefault("trace_seeds", {})[name] = {
            "num_matvecs": m, "seeds": cfg.trace_seeds, "rel_errors": errors,
            "median_rel_error": float(np.median(errors)),
        }

    # ---- diagonal
    exact_diag = None if ref is None else ref.diagonal
    e_diag = err(lambda d: relative_norm(d, exact_diag))
    as_norm = lambda d: float(np.linalg.norm(d))  # noqa: E731
    md = cfg.diagonal_matvecs
    measure(rows, name, "diagonal", "dualhess",
            dualhess_run(op, lambda o: diagonal(o, method="xdiag", num_matvecs=md, seed=0).numpy()),
            reps, e_diag, as_norm, note=f"xdiag, {md} matvecs; value = ||diag||")
    measure(rows, name, "diagonal", "dualhess-exact",
            dualhess_run(op, lambda o: diagonal(o, method="exact").numpy()),
            reps, e_diag, as_norm, note="method='exact' (BackPACK through torch_backend)")
    for tool, fn, note in (
        ("backpack", lambda: anchors.backpack_diagonal(task), "DiagHessian (exact)"),
        ("curvlinops", lambda: anchors.curvlinops_diagonal(task, md), f"xdiag, {md}"),
    ):
        if have[tool]:
            measure(rows, name, "diagonal", tool, fn, reps, e_diag, as_norm, note)
        else:
            skipped(rows, name, "diagonal", tool)

    # ---- density
    eigs = None if ref is None else ref.eigenvalues
    e_dens = err(lambda r: wasserstein(r[0], r[1], eigs))
    e_raw = err(lambda r: discrete_density(r[0], r[1], eigs))
    steps = cfg.density_steps
    for probes in cfg.density_probes:
        label = f"density {probes}x{steps}"
        measure(rows, name, label, "dualhess",
                dualhess_run(op, lambda o, p=probes: (lambda d: (d.grid, d.values))(
                    density(o, num_probes=p, num_steps=steps, seed=0))),
                reps, e_dens, lambda r: None, note="error: W1 / spectral width")
        for tool, fn, e in (
            ("pyhessian", lambda p=probes: anchors.pyhessian_density(task, p, steps), e_raw),
            ("hessian-eigenthings", lambda p=probes: anchors.eigenthings_density(task, p, steps), e_dens),
            ("curvlinops", lambda p=probes: anchors.curvlinops_density(task, p, steps), e_dens),
        ):
            if have[tool]:
                measure(rows, name, label, tool, fn, reps, e, lambda r: None,
                        "error: W1 / spectral width")
            else:
                skipped(rows, name, label, tool)


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median ``(wall, process CPU)`` seconds of ``fn()`` after ``warmup`` calls.

    CPU time is recorded too because on a shared machine wall time includes waiting for a
    core; the ratio of CPU times is the steadier measure there.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _store(out: dict[str, Any], key: str, times: tuple[float, float]) -> None:
    out[f"{key}_s"], out[f"{key}_cpu_s"] = times


def hvp_cost(task: Task, cfg: Config) -> dict[str, Any]:
    """Median seconds of one gradient and one HVP per method, torch and JAX (warmed up)."""
    import torch

    out: dict[str, Any] = {"model": task.name, "n": task.n}
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    _store(out, "torch_gradient", _median_time(
        lambda: torch.autograd.grad(task.loss_fn(model(task.X), task.y), params), cfg.hvp_repeats))
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(task.n))
    for method in ("auto", "func", "autograd", "pyhessian"):
        try:
            op = dualhess_operator(task, method)
            _store(out, f"torch_{method}_hvp", _median_time(lambda o=op: o.matvec(v), cfg.hvp_repeats))
            if method == "auto":
                out["torch_auto_method"] = op.method
        except Exception as exc:
            out[f"torch_{method}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        if not cfg.jax:
            raise RuntimeError("skipped (Config.jax=False)")
        import jax

        from .models import _x64

        with _x64():
            import jax_backend

            loss_fn, jparams, batch = jax_twin(task)
            grad = jax.jit(jax.grad(loss_fn))
            _store(out, "jax_gradient", _median_time(
                lambda: jax.block_until_ready(grad(jparams, batch)), cfg.hvp_repeats))
            op = jax_backend.hessian(loss_fn, jparams, batch)
            jv = op.asarray(v.numpy())
            _store(out, "jax_hvp", _median_time(
                lambda: jax.block_until_ready(op.matvec(jv)), cfg.hvp_repeats))
            out["jax_torch_hvp_max_abs_diff"] = float(
                np.max(np.abs(np.asarray(op.matvec(jv)) - dualhess_operator(task, "func").matvec(v).numpy())))
    except Exception as exc:
        out["jax_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for key in ("auto", "func", "autograd", "pyhessian"):
        if f"torch_{key}_hvp_s" in out:
            out[f"torch_{key}_ratio"] = out[f"torch_{key}_hvp_s"] / out["torch_gradient_s"]
            out[f"torch_{key}_cpu_ratio"] = (
                out[f"torch_{key}_hvp_cpu_s"] / out["torch_gradient_cpu_s"])
    if "jax_hvp_s" in out:
        out["jax_ratio"] = out["jax_hvp_s"] / out["jax_gradient_s"]
        out["jax_cpu_ratio"] = out["jax_hvp_cpu_s"] / out["jax_gradient_cpu_s"]
    return out


def _fill_ratios(rows: list[Row]) -> None:
    base = {(r.model, r.task): r.wall_s for r in rows if r.tool == "dualhess" and r.wall_s}
    for r in rows:
        b = base.get((r.model, r.task))
        if r.wall_s is not None and b:
            r.ratio_to_dualhess = r.wall_s / b


def _find(rows: list[Row], model: str, task: str, tool: str) -> Row | None:
    return next((r for r in rows if (r.model, r.task, r.tool) == (model, task, tool)), None)


def targets(rows: list[Row], extra: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """The issue's CPU targets, each ``met`` or missed with the measurement."""
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: str, met: bool | None, why: str = "") -> None:
        out.append({"target": name, "goal": target, "measured": measured, "met": met,
                    "why": "" if met else why})

    task = f"top-{cfg.k}"
    for model in cfg.models:
        d, s, p = (_find(rows, model, task, t) for t in ("dualhess", "scipy", "pyhessian"))
        if d and d.status == "ok":
            add(f"{model}: top-{cfg.k} accuracy", f"rel. error <= {cfg.eig_tol:g}",
                f"{d.rel_error:.1e}", d.rel_error <= cfg.eig_tol,
                "eigsh stopped on its residual test before the eigenvalues reached the target")
        if d and s and d.status == s.status == "ok":
            add(f"{model}: top-{cfg.k} HVPs vs scipy eigsh", "dualhess <= scipy (same tol)",
                f"{d.num_matvecs} vs {s.num_matvecs}", d.num_matvecs <= s.num_matvecs,
                f"thick-restart Lanczos used {d.num_matvecs} products, ARPACK {s.num_matvecs}")
        if d and p and d.status == p.status == "ok":
            add(f"{model}: top-{cfg.k} wall vs PyHessian (tol {cfg.pyhessian_tol:g})",
                ">= 3x less wall time", f"{p.wall_s / d.wall_s:.1f}x ({p.num_matvecs} vs "
                f"{d.num_matvecs} HVPs)", p.wall_s / d.wall_s >= 3.0,
                f"PyHessian took {p.wall_s:.2f} s for {p.num_matvecs} HVPs, dualhess "
                f"{d.wall_s:.2f} s for {d.num_matvecs} (per HVP: {p.wall_s / p.num_matvecs:.4f} vs "
                f"{d.wall_s / d.num_matvecs:.4f} s)")
    for model, info in extra.get("trace_seeds", {}).items():
        med = info["median_rel_error"]
        add(f"{model}: trace median rel. error ({info['seeds']} seeds, {info['num_matvecs']} matvecs)",
            "<= 0.3%", f"{100 * med:.3f}%", med <= 0.003,
            "per-seed errors: " + ", ".join(f"{100 * e:.2f}%" for e in info["rel_errors"])
            + "; see README for the analysis")
    steps = cfg.density_steps
    for model in cfg.models + ((cfg.timing_model,) if cfg.timing_model else ()):
        many = max(cfg.density_probes)
        r = _find(rows, model, f"density {many}x{steps}", "dualhess")
        one = _find(rows, model, f"density 1x{steps}", "dualhess")
        if r and r.status == "ok":
            add(f"{model}: {many} probes advance together", f"operator calls == {steps}",
                f"{r.operator_calls} calls for {r.num_matvecs} HVPs", r.operator_calls == steps,
                "the probes were not batched through matmat")
            if one and one.status == "ok":
                add(f"{model}: {many}x{steps} vs 1x{steps} wall (GPU target, informative on CPU)",
                    "<= 3x (GPU)", f"{r.wall_s / one.wall_s:.1f}x", None)
    for info in extra.get("hvp", []):
        model = info["model"]
        if "torch_auto_ratio" in info:
            ratio = info["torch_auto_ratio"]
            add(f"{model}: torch 'auto' HVP / gradient", "<= 2.2x",
                f"{ratio:.2f}x wall, {info['torch_auto_cpu_ratio']:.2f}x CPU "
                f"({info.get('torch_auto_method')}; func "
                f"{info.get('torch_func_ratio', float('nan')):.2f}x, autograd "
                f"{info.get('torch_autograd_ratio', float('nan')):.2f}x)", ratio <= 2.2,
                f"gradient {1e3 * info['torch_gradient_s']:.2f} ms, auto HVP "
                f"{1e3 * info['torch_auto_hvp_s']:.2f} ms (medians, shared machine)")
        if "jax_ratio" in info:
            ratio = info["jax_ratio"]
            add(f"{model}: JAX HVP / jitted gradient", "<= 1.5x",
                f"{ratio:.2f}x wall, {info['jax_cpu_ratio']:.2f}x CPU", ratio <= 1.5,
                f"jitted gradient {1e3 * info['jax_gradient_s']:.2f} ms, HVP "
                f"{1e3 * info['jax_hvp_s']:.2f} ms (medians, shared machine)")
    total = extra.get("total_s")
    if total is not None and cfg.name == "cpu":
        add("whole CPU suite", "< 600 s on 2 cores", f"{total:.0f} s", total < 600,
            "the machine was shared with other test runs")
    return out


def run_suite(cfg: Config = CPU, *, cache_dir: Path | str | None = RESULTS_DIR,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every task on every model and anchor; returns the JSON-able results."""
    import torch

    t0 = time.perf_counter()
    rows: list[Row] = []
    extra: dict[str, Any] = {"references": {}, "hvp": []}
    sizes = cfg.sizes or {}
    for name in cfg.models:
        task = build_task(name, batch=cfg.batch, sizes=sizes.get(name))
        ref = reference(task, cache_dir)
        extra["references"][name] = {
            "n": task.n, "top": ref.top(cfg.k).tolist(), "trace": ref.trace,
            "lambda_min": float(ref.eigenvalues[0]), "seconds": ref.seconds, "cached": ref.cached,
        }
        log(f"[{time.perf_counter() - t0:6.1f}s] {name}: n={task.n}, reference "
            f"{'cached' if ref.cached else f'computed in {ref.seconds:.1f}s'}")
        bench_model(task, ref, cfg, rows, extra)
        extra["hvp"].append(hvp_cost(task, cfg))
        log(f"[{time.perf_counter() - t0:6.1f}s] {name}: done")
    if cfg.timing_model:
        name = cfg.timing_model
        task = build_task(name, batch=cfg.batch, sizes=sizes.get(name))
        bench_model(task, None, cfg, rows, extra)
        extra["hvp"].append(hvp_cost(task, cfg))
        log(f"[{time.perf_counter() - t0:6.1f}s] {name}: done (timing only)")
    _fill_ratios(rows)
    extra["total_s"] = time.perf_counter() - t0
    return {
        "suite": cfg.name,
        "config": dataclasses.asdict(cfg),
        "environment": _environment(torch),
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets": targets(rows, extra, cfg),
        **extra,
    }


def _environment(torch: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
    }
    for dist in ("jax", "numpy", "scipy", "PyHessian", "curvlinops-for-pytorch",
                 "hessian-eigenthings", "backpack-for-pytorch"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    return env


# ---------------------------------------------------------------------- output
def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else format(x, spec)
    if isinstance(x, list):
        return ", ".join(format(v, ".6g") for v in x)
    return str(x)


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report: environment, targets, then one table per model."""
    env = results["environment"]
    lines = [
        f"# dualhess benchmarks: {results['suite']} suite",
        "",
        f"torch {env['torch']} ({env['torch_threads']} threads), jax {env.get('jax')}, "
        f"{env['cpus']} CPUs, load average at the end {', '.join(f'{x:.1f}' for x in env['load_average'])}; "
        f"total {results['total_s']:.0f} s. float64 everywhere; wall time = median of repeats.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met | why (when missed) |",
        "|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        met = {True: "met", False: "**missed**", None: "n/a (GPU)"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} | {t['why']} |")
    lines += ["", "## HVP cost (median seconds, warmed up)", "",
              "| model | n | gradient | auto (picked) | func | autograd | pyhessian | "
              "JAX jit gradient | JAX HVP |", "|---|---|---|---|---|---|---|---|---|"]
    for h in results["hvp"]:
        def c(key: str, ratio: str | None = None, h: dict[str, Any] = h) -> str:
            if key not in h:
                return "error" if any(k.endswith("error") for k in h) else ""
            r = h.get(ratio) if ratio else None
            return f"{1e3 * h[key]:.2f} ms" + (f" ({r:.2f}x)" if r is not None else "")

        lines.append(
            f"| {h['model']} | {h['n']} | {c('torch_gradient_s')} | {c('torch_auto_hvp_s', 'torch_auto_ratio')} "
            f"{h.get('torch_auto_method', '')} | {c('torch_func_hvp_s', 'torch_func_ratio')} | "
            f"{c('torch_autograd_hvp_s', 'torch_autograd_ratio')} | "
            f"{c('torch_pyhessian_hvp_s', 'torch_pyhessian_ratio')} | {c('jax_gradient_s')} | "
            f"{c('jax_hvp_s', 'jax_ratio')} |")
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    for model in models:
        ref = results["references"].get(model)
        lines += ["", f"## {model}" + (f" (n = {ref['n']})" if ref else " (timing only, no reference)")]
        if ref:
            lines += ["", f"Exact: top = {_fmt(ref['top'])}; trace = {ref['trace']:.10g}; "
                      f"lambda_min = {ref['lambda_min']:.6g}."]
        lines += ["", "| task | tool | status | value | rel. error | HVPs | operator calls | "
                  "wall (s) | x dualhess | note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["rows"]:
            if r["model"] != model:
                continue
            lines.append(
                f"| {r['task']} | {r['tool']} | {r['status']} | {_fmt(r['value'])} | "
                f"{_fmt(r['rel_error'], '.2e')} | {_fmt(r['num_matvecs'])} | "
                f"{_fmt(r['operator_calls'])} | {_fmt(r['wall_s'], '.3f')} | "
                f"{_fmt(r['ratio_to_dualhess'], '.2f')} | {' '.join(r['note'].split()).replace('|', '/')} |")
    trace_seeds = results.get("trace_seeds", {})
    if trace_seeds:
        lines += ["", "## Trace over seeds (dualhess xtrace)", ""]
        for model, info in trace_seeds.items():
            errs = ", ".join(f"{100 * e:.3f}%" for e in info["rel_errors"])
            lines.append(f"- {model}: median {100 * info['median_rel_error']:.3f}% ({errs})")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``<suite>.json`` and ``<suite>.md`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{results['suite']}.json", out_dir / f"{results['suite']}.md"
    json_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("cpu", "smoke", "realistic", "realistic-smoke"),
                        default="cpu")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output folder (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the exact references")
    args = parser.parse_args(argv)
    if args.suite.startswith("realistic"):
        return _main_realistic(args)
    cfg = CPU if args.suite == "cpu" else SMOKE
    if args.repeats is not None:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    try:
        cache = None if args.no_cache or cfg.name != "cpu" else RESULTS_DIR
        results = run_suite(cfg, cache_dir=cache)
    except Exception:
        traceback.print_exc()
        return 1
    json_path, md_path = write_results(results, args.out)
    print(f"wrote {json_path} and {md_path}")
    missed = [t["target"] for t in results["targets"] if t["met"] is False]
    print(f"{len(results['targets'])} targets, {len(missed)} missed" + (f": {missed}" if missed else ""))
    return 0


def _main_realistic(args: argparse.Namespace) -> int:
    """``--suite realistic``: the end-to-end part (results/realistic.{json,md})."""
    from . import realistic

    tiny = args.suite == "realistic-smoke"
    sizes = realistic.TINY if tiny else realistic.Sizes()
    results = realistic.run_realistic(sizes, repeats=args.repeats or (1 if tiny else 3))
    if tiny:
        results["suite"] = "realistic-smoke"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{results['suite']}.json", out / f"{results['suite']}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(realistic.markdown(results))
    print(f"wrote {json_path} and {md_path}")
    missed = [t["target"] for t in results["targets"] if t["met"] is False]
    print(f"{len(results['targets'])} targets, {len(missed)} missed" + (f": {missed}" if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
