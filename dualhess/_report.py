"""Writing what ``dualhess analyze`` found, and comparing two reports.

:func:`write_report` turns the dict of :func:`dualhess._analysis.analyze` into a directory:

``report.json``
    Every number, the settings, the package versions, the seed, timings and product counts;
    the keys are documented in :data:`SCHEMA`.
``density.png``
    The eigenvalue density (SLQ, Gaussian broadening) on a log scale, frameworks overlaid.
``eigenvalues.png``
    The top-``k`` eigenvalues of each framework.
``landscape.png``
    With ``--landscape``: the loss along the top eigenvector, frameworks overlaid.
``per_layer.png``, ``per_layer_density.png``
    With ``--per-layer``: the top eigenvalue and trace of each layer's block, and the
    eigenvalue density of each block (stacked, one row per block).
``report.md``
    Tables of the numbers (paste into a paper) and the figures embedded.

:func:`compare` reads two ``report.json`` files and writes overlaid figures and a table of
differences (``compare.md``, ``compare.json``, ``density.png``, ``eigenvalues.png``).

matplotlib is imported only when a figure is drawn, with the non-interactive ``Agg`` backend.

Examples
--------
>>> from dualhess._report import format_table, SCHEMA
>>> "results.<framework>.summary.lambda_max" in SCHEMA
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._plotting import plot_report_density, plot_report_eigenvalues, plot_report_landscape

__all__ = [
    "SCHEMA",
    "REPORT_FILES",
    "SCHEMA_VERSION",
    "write_report",
    "format_table",
    "markdown_report",
    "load_report",
    "compare",
    "schema_keys",
    "missing_keys",
]

SCHEMA_VERSION = 1

#: The files ``dualhess analyze`` writes (plots only without ``--no-plots``).
REPORT_FILES = ("report.json", "report.md", "density.png", "eigenvalues.png")

#: The keys of ``report.json``. ``<framework>`` stands for each entry of ``frameworks``.
SCHEMA: dict[str, str] = {
    "schema_version": "integer, the version of this layout (1)",
    "created": "UTC time the report was written (ISO 8601)",
    "command": "the command line that made the report",
    "source": "'demo' (the embedded default) or the path of the user file",
    "seed": "the seed of every random draw (probes are numpy float64, identical in both frameworks)",
    "settings": "every option: framework, top_k, trace_matvecs, density_probes, density_steps, "
    "seed, dtype, device, params, eig_tol, crosscheck_probes, progress, landscape, "
    "landscape_radius, landscape_points",
    "versions": "python, numpy, dualhess and, when installed, scipy, torch, jax, jaxlib, flax, "
    "optax, backpack-for-pytorch, matplotlib",
    "model": "framework, type, num_params (n), params (the selected block or null), layout "
    "(name, shape, start, stop of each parameter tensor), twin_error (why the JAX twin of a "
    "PyTorch model could not be built when --framework was not given, else null), dtype (the "
    "model's own floating dtype), dtype_note (null, or that a model of another dtype was "
    "analysed as a copy in --dtype)",
    "frameworks": "the frameworks that computed, e.g. ['torch', 'jax']",
    "results.<framework>.n": "size of the operator (number of parameters in the block)",
    "results.<framework>.dtype": "dtype of the computation",
    "results.<framework>.eigenvalues.values": "top-k eigenvalues, descending",
    "results.<framework>.eigenvalues.residuals": "||H v - lambda v|| of each eigenpair",
    "results.<framework>.eigenvalues.converged": "whether each pair met the tolerance",
    "results.<framework>.eigenvalues.tol": "bound on each eigenvalue's error, relative to max |lambda| (eigsh's criterion='eigenvalue')",
    "results.<framework>.eigenvalues.num_matvecs": "Hessian-vector products spent",
    "results.<framework>.lambda_min": "value, residual, converged, num_matvecs of the smallest "
    "eigenvalue",
    "results.<framework>.trace.xtrace": "value, stderr (XTrace's leave-one-out estimate), "
    "num_matvecs",
    "results.<framework>.trace.exact": "value (BackPACK's exact trace) or null, and the reason "
    "when null",
    "results.<framework>.density.grid": "points where the density is evaluated",
    "results.<framework>.density.values": "the Gaussian-broadened density (integrates to 1)",
    "results.<framework>.density.nodes": "Ritz values, one row per probe",
    "results.<framework>.density.weights": "quadrature weights, one row per probe (rows sum to 1)",
    "results.<framework>.density.sigma": "the broadening width",
    "results.<framework>.gradient_overlap": "norm(P_k g)^2 / norm(g)^2: the fraction of the "
    "gradient g of the loss in the span of the top-k eigenvectors (Gur-Ari et al. 2018, "
    "arXiv:1812.04754): value, k, per_direction ((v_i . g)^2 / norm(g)^2), eigenvalues, "
    "gradient_norm; value null and the reason for an operator without a loss",
    "results.<framework>.landscape": "null unless --landscape; else the loss on the 1-D slice "
    "theta + t v_1 along the unit top eigenvector (sign: its largest entry positive, the same "
    "in both frameworks): offsets (t), values, center_loss, eigenvalues, radius, "
    "num_evaluations, curvature (second difference at t = 0, about lambda_max)",
    "results.<framework>.summary.lambda_max": "largest eigenvalue",
    "results.<framework>.summary.lambda_min": "smallest eigenvalue",
    "results.<framework>.summary.negative_mass": "spectral mass below zero: mean over probes of "
    "the weights of nodes below -negative_mass_threshold",
    "results.<framework>.summary.negative_mass_threshold": "1e-3 * max|lambda|: eigenvalues "
    "between -threshold and 0 belong to the near-zero cluster SLQ cannot resolve",
    "results.<framework>.summary.trace": "the exact trace when available, else XTrace's",
    "results.<framework>.timings": "seconds per step (eigsh, eigsh_min, trace, exact_trace, "
    "density)",
    "results.<framework>.num_matvecs": "products per step and total",
    "crosscheck": "null with one framework; else the crosscheck report (passed, rtol, "
    "max_rel_diff, quad_rel_diff, trace_a, trace_b, blocks, failing_blocks, checks, summary)",
    "agreement": "null with one framework; else the differences of the two frameworks' numbers "
    "(eigenvalues_max_abs_diff, eigenvalues_max_rel_diff, eigenvalues_bound, "
    "eigenvalues_agree, trace_abs_diff, trace_rel_diff, density_max_abs_diff, "
    "gradient_overlap_diff, landscape_max_abs_diff, passed)",
    "timings": "seconds: setup (training or loading), build_<framework>, each framework's "
    "analysis, crosscheck, total",
    "num_matvecs": "total Hessian-vector products per framework",
    "per_layer": "null unless --per-layer; else framework, rows (layer, size, top "
    "eigenvalue, its residual, trace and how it was computed) of each layer's Hessian block, "
    "and densities (each block's SLQ density: grid, values) with distances (the "
    "Jensen-Shannon distance between every two blocks' densities on a common grid)",
    "files": "the files written next to report.json",
    "figures_skipped": "null, or why the figures could not be drawn (matplotlib not "
    "installed: the pip command)",
}


def schema_keys(report: dict[str, Any]) -> list[str]:
    """The concrete dotted keys :data:`SCHEMA` asks of ``report`` (``<framework>`` expanded)."""
    keys = []
    for key in SCHEMA:
        if "<framework>" in key:
            keys.extend(key.replace("<framework>", fw) for fw in report.get("frameworks", []))
        else:
            keys.append(key)
    return keys


def missing_keys(report: dict[str, Any]) -> list[str]:
    """The documented keys absent from ``report`` (empty when the report is complete)."""
    missing = []
    for key in schema_keys(report):
        node: Any = report
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


# ---------------------------------------------------------------------- text
def _g(x: Any, digits: int = 10) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _e(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.2e}"


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    frameworks = report["frameworks"]
    res = report["results"]
    header = ["quantity", *frameworks]
    rows = [
        ["parameters n", *[_g(res[f]["n"]) for f in frameworks]],
        ["dtype", *[res[f]["dtype"] for f in frameworks]],
        ["lambda_max", *[_g(res[f]["summary"]["lambda_max"], 12) for f in frameworks]],
        ["lambda_min", *[_g(res[f]["summary"]["lambda_min"], 12) for f in frameworks]],
    ]
    rows.append([
        "trace (XTrace +- stderr)",
        *[f"{_g(res[f]['trace']['xtrace']['value'])} +- {_e(res[f]['trace']['xtrace']['stderr'])}"
          for f in frameworks],
    ])
    rows.append(["trace (exact)", *[_g(res[f]["trace"]["exact"]["value"], 12) for f in frameworks]])
    rows.append(["negative spectral mass", *[_g(res[f]["summary"]["negative_mass"], 6)
                                             for f in frameworks]])
    overlaps = [res[f].get("gradient_overlap") or {} for f in frameworks]
    if any(o.get("value") is not None for o in overlaps):
        rows.append([f"gradient overlap (top-{overlaps[0].get('k', '?')})",
                     *[_g(o.get("value"), 8) for o in overlaps]])
    lands = [res[f].get("landscape") or {} for f in frameworks]
    if any(ls.get("values") is not None for ls in lands):
        rows.append(["landscape curvature at 0", *[_g(ls.get("curvature"), 8) for ls in lands]])
    k = len(res[frameworks[0]]["eigenvalues"]["values"])
    for i in range(k):
        cells = []
        for f in frameworks:
            eig = res[f]["eigenvalues"]
            if i < len(eig["values"]):
                mark = "" if eig["converged"][i] else " (not converged)"
                cells.append(f"{_g(eig['values'][i], 14)} (res {_e(eig['residuals'][i])}){mark}")
            else:
                cells.append("")
        rows.append([f"lambda_{i + 1}", *cells])
    rows.append(["Hessian-vector products", *[_g(res[f]["num_matvecs"]["total"]) for f in frameworks]])
    rows.append(["time (s)", *[f"{report['timings'].get(f, float('nan')):.2f}" for f in frameworks]])
    return header, rows


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _agreement_lines(report: dict[str, Any]) -> list[str]:
    agr = report.get("agreement")
    if not agr:
        return []
    a, b = agr["labels"]
    cross = report.get("crosscheck") or {}
    return [
        f"{a} vs {b}: {'AGREE' if agr['passed'] else 'DISAGREE'} (rtol {agr['rtol']:.0e})",
        f"  Hessian-vector products: max rel diff {_e(cross.get('max_rel_diff'))} over "
        f"{cross.get('num_probes', '?')} shared probes",
        f"  top eigenvalues: max diff {_e(agr['eigenvalues_max_abs_diff'])} (relative "
        f"{_e(agr['eigenvalues_max_rel_diff'])}, allowed {_e(agr['eigenvalues_bound'])})",
        f"  XTrace: rel diff {_e(agr['trace_rel_diff'])};  density: max diff "
        f"{_e(agr['density_max_abs_diff'])}",
    ]


def format_table(report: dict[str, Any]) -> str:
    """The plain-text summary printed on screen (aligned columns)."""
    header, rows = _rows(report)
    lines = [_aligned(header, rows)]
    agree = _agreement_lines(report)
    if agree:
        lines += ["", *agree]
    twin_error = report.get("model", {}).get("twin_error")
    if twin_error:
        lines += ["", f"no crosscheck: the JAX twin could not be built ({twin_error[:160]}); "
                  "analysed in PyTorch only"]
    reasons = {f: r["trace"]["exact"]["reason"] for f, r in report["results"].items()
               if r["trace"]["exact"]["value"] is None}
    for f, reason in reasons.items():
        lines.append(f"exact trace ({f}) unavailable: {str(reason).splitlines()[0][:160]}")
    if reasons:
        lines.append("the trace to quote: the exact trace where shown, else XTrace +- its "
                     "standard error")
    if model_note := report.get("model", {}).get("dtype_note"):
        lines.append(f"note: {model_note}")
    if report.get("figures_skipped"):
        lines.append(f"figures skipped: {report['figures_skipped']}")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], *, plots: bool = True) -> str:
    """The text of ``report.md``: tables of every summary number, figures embedded."""
    header, rows = _rows(report)
    s = report["settings"]
    src = report.get("source", "")
    model = report.get("model", {})
    out = [
        "# Hessian spectrum report (dualhess)",
        "",
        f"Model: {model.get('type', '?')} ({model.get('framework', '?')}), "
        f"{model.get('num_params', '?')} parameters"
        + (f" (block: {', '.join(model['params'])})" if model.get("params") else "")
        + f"; source: `{src}`.",
        "",
        f"Settings: top-{s['top_k']} eigenvalues (thick-restart Lanczos, eigenvalue errors "
        f"bounded by {s['eig_tol']:.0e} x max |lambda|); trace by XTrace with {s['trace_matvecs']} products; "
        f"density by stochastic Lanczos quadrature with {s['density_probes']} probes x "
        f"{s['density_steps']} steps; {s['dtype']}; seed {report['seed']}.",
        "",
        "## Summary",
        "",
        _markdown_table(header, rows),
        "",
    ]
    agree = _agreement_lines(report)
    if model.get("dtype_note"):
        out += [f"Note: {model['dtype_note']}.", ""]
    out += ["The trace to quote is the exact trace where the summary shows one, else XTrace "
            "with its standard error"
            + ("; the crosscheck's Hutchinson traces below use a few shared probes and serve "
               "only to compare the frameworks." if agree else "."), ""]
    if agree:
        out += ["## Cross-framework check", "", "```", *agree, "", report["crosscheck"]["summary"],
                "```", ""]
    elif model.get("twin_error"):
        out += ["## Cross-framework check", "",
                f"Not run: the JAX twin could not be built ({model['twin_error']}).", ""]
    for f, r in report["results"].items():
        if r["trace"]["exact"]["value"] is None:
            out += [f"Exact trace ({f}) unavailable: {r['trace']['exact']['reason']}", ""]
    if report.get("figures_skipped"):
        out += [f"Figures skipped: {report['figures_skipped']}", ""]
    if plots:
        out += ["## Figures", "", "![Eigenvalue density (log scale)](density.png)", "",
                "![Top eigenvalues](eigenvalues.png)", ""]
        if "landscape.png" in report.get("files", []):
            out += ["![The loss along the top eigenvector](landscape.png)", ""]
        if "per_layer_density.png" in report.get("files", []):
            out += ["![The eigenvalue density of each layer's block](per_layer_density.png)", ""]
    out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
            f"Total time {report['timings'].get('total', float('nan')):.1f} s. "
            "Every number is in `report.json`.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------- files
def write_report(report: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (unless ``plots=False``) the two PNGs.

    Returns the paths written. ``report`` is the dict of :func:`dualhess._analysis.analyze`
    completed with ``settings``, ``versions``, ``seed`` and the other top-level keys of
    :data:`SCHEMA` (the CLI fills them in).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["report.json", "report.md"] + (["density.png", "eigenvalues.png"] if plots else [])
    if plots and report.get("per_layer") is not None and (out / "per_layer.png").exists():
        names.append("per_layer.png")
    if plots and report.get("per_layer") is not None and (out / "per_layer_density.png").exists():
        names.append("per_layer_density.png")
    lands = [(f, r["landscape"]) for f, r in report["results"].items()
             if (r.get("landscape") or {}).get("values") is not None]
    if plots and lands:
        names.append("landscape.png")
    report["files"] = names
    report.setdefault("figures_skipped", None)
    missing = missing_keys(report)
    if missing:
        raise ValueError(f"the report lacks documented keys: {', '.join(missing)}")
    frameworks = report["frameworks"]
    written = []
    if plots:
        model = report.get("model", {})
        title = f"{model.get('type', 'model')}, n = {model.get('num_params', '?')}"
        plot_report_density([(f, report["results"][f]["density"]) for f in frameworks],
                      out / "density.png", f"Hessian eigenvalue density: {title}")
        plot_report_eigenvalues([(f, report["results"][f]["eigenvalues"]) for f in frameworks],
                          out / "eigenvalues.png", f"Top eigenvalues: {title}")
        written += [out / "density.png", out / "eigenvalues.png"]
        if lands:
            plot_report_landscape(lands, out / "landscape.png", f"Loss along the top eigenvector: "
                                  f"{title}")
            written.append(out / "landscape.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    (out / "report.md").write_text(markdown_report(report, plots=plots))
    extra = [out / name for name in ("per_layer.png", "per_layer_density.png") if name in names]
    return [out / "report.json", out / "report.md", *written, *extra]


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or the directory holding one), with a clear error if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such report (expected a report.json written by "
                                "`dualhess analyze`)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or "results" not in report or "frameworks" not in report:
        raise ValueError(f"{path}: not a dualhess report.json (no 'results'/'frameworks')")
    return report


#: What :func:`compare` reads of each report's framework results.
COMPARED_KEYS = ("n", "summary.lambda_max", "summary.lambda_min", "summary.negative_mass",
                 "trace.xtrace.value", "trace.exact.value", "eigenvalues.values", "density")


def _check_compared(report: dict[str, Any], framework: str, path: Any, plots: bool) -> None:
    """Refuse a report that lacks a section :func:`compare` reads, naming the file and keys."""
    missing = []
    for key in COMPARED_KEYS:
        if key == "density" and not plots:
            continue
        node: Any = report["results"][framework]
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(f"results.{framework}.{key}")
                break
            node = node[part]
    if missing:
        raise ValueError(
            f"{path}: the report lacks {', '.join(missing)}; it was not written by `dualhess "
            "analyze` or was edited: re-run `dualhess analyze` to write a complete report"
        )


def _pick(report: dict[str, Any], framework: str | None, path: Any) -> str:
    frameworks = report["frameworks"]
    results = report["results"]
    if not isinstance(frameworks, list) or not frameworks or not isinstance(results, dict):
        raise ValueError(f"{path}: the report names no framework results ('frameworks' is "
                         f"{frameworks!r}); re-run `dualhess analyze` to write a complete report")
    absent = [f for f in frameworks if f not in results]
    if absent:
        raise ValueError(f"{path}: 'frameworks' lists {', '.join(absent)} but 'results' has no "
                         "such section; re-run `dualhess analyze` to write a complete report")
    if framework is None:
        return report["frameworks"][0]
    if framework not in report["results"]:
        raise ValueError(f"{path}: has no {framework!r} results (it has "
                         f"{', '.join(report['frameworks'])})")
    return framework


def _diff_row(name: str, a: Any, b: Any) -> dict[str, Any]:
    if a is None or b is None:
        return {"quantity": name, "a": a, "b": b, "diff": None, "rel_diff": None}
    diff = float(b) - float(a)
    scale = max(abs(float(a)), abs(float(b)))
    return {"quantity": name, "a": float(a), "b": float(b), "diff": diff,
            "rel_diff": abs(diff) / scale if scale > 0 else 0.0}


def compare(
    path_a: str | Path,
    path_b: str | Path,
    out_dir: str | Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    framework: str | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Compare two reports: a table of differences, overlaid density and eigenvalue plots.

    Parameters
    ----------
    path_a, path_b : path
        Two ``report.json`` files (or their directories), e.g. before and after training,
        two optimisers, two frameworks.
    out_dir : path, optional
        Where ``compare.json``, ``compare.md`` and the PNGs go; nothing is written when None.
    labels : (str, str), optional
        Names of the two in the table and legends (default ``A``, ``B``).
    framework : str, optional
        Which framework's numbers to take from each report (default: the first of each).

    Returns
    -------
    dict
        ``labels``, ``reports`` (paths), ``frameworks`` (the one taken from each), ``rows``
        (quantity, a, b, diff = b - a, rel_diff) and ``table`` (the printed text).

    Examples
    --------
    >>> out = compare("before/report.json", "after/report.json", "cmp",
    ...               labels=("before", "after"))  # doctest: +SKIP
    >>> print(out["table"])  # doctest: +SKIP
    """
    ra, rb = load_report(path_a), load_report(path_b)
    labels = tuple(labels) if labels is not None else ("A", "B")
    if len(labels) != 2:
        raise ValueError(f"--labels takes two names, got {len(labels)}")
    fa, fb = _pick(ra, framework, path_a), _pick(rb, framework, path_b)
    _check_compared(ra, fa, path_a, plots and out_dir is not None)
    _check_compared(rb, fb, path_b, plots and out_dir is not None)
    a, b = ra["results"][fa], rb["results"][fb]
    rows = [
        _diff_row("parameters n", a["n"], b["n"]),
        _diff_row("lambda_max", a["summary"]["lambda_max"], b["summary"]["lambda_max"]),
        _diff_row("lambda_min", a["summary"]["lambda_min"], b["summary"]["lambda_min"]),
        _diff_row("trace (XTrace)", a["trace"]["xtrace"]["value"], b["trace"]["xtrace"]["value"]),
        _diff_row("trace (exact)", a["trace"]["exact"]["value"], b["trace"]["exact"]["value"]),
        _diff_row("negative spectral mass", a["summary"]["negative_mass"],
                  b["summary"]["negative_mass"]),
    ]
    va, vb = a["eigenvalues"]["values"], b["eigenvalues"]["values"]
    for i in range(max(len(va), len(vb))):
        rows.append(_diff_row(f"lambda_{i + 1}", va[i] if i < len(va) else None,
                              vb[i] if i < len(vb) else None))
    name_a, name_b = f"{labels[0]} ({fa})", f"{labels[1]} ({fb})"
    header = ["quantity", name_a, name_b, "B - A", "rel diff"]
    cells = [[r["quantity"], _g(r["a"], 12), _g(r["b"], 12),
              "n/a" if r["diff"] is None else f"{r['diff']:.4g}", _e(r["rel_diff"])] for r in rows]
    sa, sb = ra.get("settings") or {}, rb.get("settings") or {}
    settings_diff = {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb))
                     if sa.get(k) != sb.get(k)}
    table = _aligned(header, cells)
    result: dict[str, Any] = {
        "labels": list(labels),
        "reports": [str(path_a), str(path_b)],
        "frameworks": [fa, fb],
        "rows": rows,
        "settings_differences": settings_diff,
        "table": table,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = ["compare.json", "compare.md"]
        if plots:
            plot_report_density([(name_a, a["density"]), (name_b, b["density"])], out / "density.png",
                          "Hessian eigenvalue density")
            plot_report_eigenvalues([(name_a, a["eigenvalues"]), (name_b, b["eigenvalues"])],
                              out / "eigenvalues.png", "Top eigenvalues")
            files += ["density.png", "eigenvalues.png"]
        result["files"] = files
        md = ["# Comparison of two Hessian spectrum reports (dualhess)", "",
              f"A = {labels[0]}: `{path_a}` ({fa}); B = {labels[1]}: `{path_b}` ({fb}).", "",
              _markdown_table(header, cells), ""]
        if settings_diff:
            md += ["Settings that differ: " + "; ".join(f"{k}: {v[0]} vs {v[1]}"
                                                         for k, v in settings_diff.items()), ""]
        if plots:
            md += ["![Eigenvalue density (log scale)](density.png)", "",
                   "![Top eigenvalues](eigenvalues.png)", ""]
        (out / "compare.md").write_text("\n".join(md))
        (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
