"""The analysis pipeline, the report files and `compare` on operators with a known spectrum.

No framework is needed: the operators are numpy matrices, one of them seen through a
random permutation (as the JAX twin's Hessian is), so every number has an exact answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualhess import DenseOperator
from dualhess._alignment import Alignment
from dualhess._analysis import (
    AnalysisSettings,
    negative_mass,
    resolve_params,
    run_analysis,
)
from dualhess._report import REPORT_FILES, SCHEMA, compare, missing_keys, write_report
from dualhess._wrappers import PermutedOperator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = 60
SPECTRUM = np.concatenate([[9.0, 7.5, 6.0, 4.0], np.linspace(-1.5, 2.0, N - 4)])


def _matrix(scale: float = 1.0) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((N, N)))
    return (Q * (scale * SPECTRUM)) @ Q.T


def _settings(**kw) -> AnalysisSettings:
    base = dict(top_k=3, trace_matvecs=30, density_probes=3, density_steps=20, seed=1,
                progress=False)
    base.update(kw)
    return AnalysisSettings(**base)


def _full_report(scale: float = 1.0) -> dict:
    """A report of the same matrix seen in two flat orders, completed like the CLI does."""
    A = _matrix(scale)
    perm = np.random.default_rng(5).permutation(N)
    align = Alignment(perm, blocks=[("w", np.arange(40)), ("b", np.arange(40, N))])
    ops = {"a": DenseOperator(A), "b": PermutedOperator(DenseOperator(A[np.ix_(perm, perm)]), align)}
    settings = _settings()
    report = run_analysis(ops, settings, alignment=align)
    report.update(schema_version=1, created="now", command="test", source="test", seed=1,
                  settings=settings.to_dict(), versions={"numpy": np.__version__},
                  model={"framework": "numpy", "type": "matrix", "num_params": N,
                         "params": None, "layout": None},
                  num_matvecs={k: r["num_matvecs"]["total"] for k, r in report["results"].items()},
                  per_layer=None)
    report["timings"]["total"] = 0.0
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    return _full_report()


def test_numbers_are_exact(report):
    top = np.sort(SPECTRUM)[::-1][:3]
    for label in ("a", "b"):
        res = report["results"][label]
        np.testing.assert_allclose(res["eigenvalues"]["values"], top, rtol=1e-10)
        assert all(res["eigenvalues"]["converged"])
        assert res["summary"]["lambda_max"] == pytest.approx(9.0, rel=1e-10)
        assert res["summary"]["lambda_min"] == pytest.approx(-1.5, rel=1e-8)
        assert res["trace"]["exact"]["value"] == pytest.approx(SPECTRUM.sum(), rel=1e-12)
        assert res["trace"]["exact"]["reason"] is None
        weights = np.asarray(res["density"]["weights"])
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
        grid, values = np.asarray(res["density"]["grid"]), np.asarray(res["density"]["values"])
        assert np.trapezoid(values, grid) == pytest.approx(1.0, rel=1e-6)
        assert res["num_matvecs"]["total"] == sum(
            v for k, v in res["num_matvecs"].items() if k != "total")
    # identical probes on both sides: the stochastic numbers agree to round-off too
    a, b = report["results"]["a"], report["results"]["b"]
    assert a["trace"]["xtrace"]["value"] == pytest.approx(b["trace"]["xtrace"]["value"], rel=1e-10)
    np.testing.assert_allclose(a["density"]["values"], b["density"]["values"], rtol=1e-8, atol=1e-10)
    assert report["crosscheck"]["passed"] and report["agreement"]["passed"]
    assert report["agreement"]["eigenvalues_max_rel_diff"] < 1e-10
    assert [bl["name"] for bl in report["crosscheck"]["blocks"]] == ["w", "b"]


def test_negative_mass_counts_weights_below_zero(report):
    res = report["results"]["a"]
    nodes, weights = np.asarray(res["density"]["nodes"]), np.asarray(res["density"]["weights"])
    thr = res["summary"]["negative_mass_threshold"]
    expected = np.mean([w[n < -thr].sum() for n, w in zip(nodes, weights)])
    assert res["summary"]["negative_mass"] == pytest.approx(expected, abs=1e-15)
    assert 0 < res["summary"]["negative_mass"] < 1
    assert negative_mass([[-1.0, 1e-20, 2.0]], [[0.2, 0.3, 0.5]]) == pytest.approx(0.2)
    assert negative_mass([[-1e-9, 2.0]], [[0.4, 0.6]], threshold=1e-8) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        negative_mass([[1.0, 2.0]], [[1.0]])


def test_report_files(report, tmp_path):
    import matplotlib.image

    paths = write_report(report, tmp_path)
    assert sorted(p.name for p in paths) == sorted(REPORT_FILES)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert missing_keys(loaded) == []
    assert loaded["results"]["a"]["eigenvalues"]["values"] == report["results"]["a"]["eigenvalues"]["values"]
    for name in ("density.png", "eigenvalues.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    md = (tmp_path / "report.md").read_text()
    assert "](density.png)" in md and "](eigenvalues.png)" in md
    assert f"{report['results']['a']['summary']['lambda_max']:.10g}" in md


def test_documented_keys_are_checked():
    broken = _full_report()
    del broken["results"]["b"]["summary"]["negative_mass"]
    del broken["seed"]
    assert set(missing_keys(broken)) == {"seed", "results.b.summary.negative_mass", "files",
                                       "figures_skipped"}
    with pytest.raises(ValueError, match="seed"):
        write_report(broken, "/nonexistent-never-written", plots=False)
    assert all(isinstance(v, str) and v for v in SCHEMA.values())


def test_no_plots_writes_no_png(report, tmp_path):
    write_report(report, tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert "density.png" not in (tmp_path / "report.md").read_text()


def test_compare_two_reports(tmp_path):
    write_report(_full_report(1.0), tmp_path / "A", plots=False)
    write_report(_full_report(2.0), tmp_path / "B", plots=False)
    out = compare(tmp_path / "A" / "report.json", tmp_path / "B", tmp_path / "C",
                  labels=("before", "after"), framework="b")
    rows = {r["quantity"]: r for r in out["rows"]}
    assert rows["lambda_max"]["diff"] == pytest.approx(9.0, rel=1e-9)  # 18 - 9
    assert rows["lambda_min"]["diff"] == pytest.approx(-1.5, rel=1e-7)
    assert rows["trace (exact)"]["diff"] == pytest.approx(SPECTRUM.sum(), rel=1e-10)
    assert rows["lambda_max"]["rel_diff"] == pytest.approx(0.5, rel=1e-9)
    assert rows["parameters n"]["diff"] == 0
    assert "before (b)" in out["table"] and "after (b)" in out["table"]
    for name in ("compare.json", "compare.md", "density.png", "eigenvalues.png"):
        assert (tmp_path / "C" / name).stat().st_size > 0
    assert json.loads((tmp_path / "C" / "compare.json").read_text())["labels"] == ["before", "after"]
    with pytest.raises(ValueError, match="no 'torch' results"):
        compare(tmp_path / "A", tmp_path / "B", framework="torch")
    with pytest.raises(FileNotFoundError, match="no such report"):
        compare(tmp_path / "A", tmp_path / "missing")


def test_resolve_params():
    names = ["conv1.weight", "conv1.bias", "fc.weight", "fc.bias"]
    assert resolve_params(None, names) is None
    assert resolve_params("fc", names) == ["fc.weight", "fc.bias"]
    assert resolve_params(" fc.bias , conv1 ", names) == ["conv1.weight", "conv1.bias", "fc.bias"]
    with pytest.raises(ValueError, match="'head' matches no parameter; the model has: conv1.weight"):
        resolve_params("head", names)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("top_k", 0, "--top-k"), ("dtype", "float16", "--dtype"), ("framework", "mxnet", "--framework"),
     ("density_steps", 1, "--density-steps"), ("seed", -1, "--seed")],
)
def test_settings_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        _settings(**{field: value}).validate()


def test_top_k_must_be_below_n():
    with pytest.raises(ValueError, match="--top-k must be < n = 4"):
        run_analysis({"a": DenseOperator(np.eye(4))}, _settings(top_k=4))


def test_readme_documents_exactly_the_schema():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "report.md").read_text()
    section = text.split("## `report.json` keys", 1)[1]
    documented = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert documented == list(SCHEMA)


def test_host_operator_reorders_and_keeps_dtype():
    from dualhess._wrappers import HostOperator

    A = _matrix()
    perm = np.random.default_rng(7).permutation(N)
    op = HostOperator(DenseOperator(A[np.ix_(perm, perm)]), Alignment(perm))
    V = np.random.default_rng(8).standard_normal((N, 4))
    np.testing.assert_allclose(op.matmat(V), A @ V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.matvec(V[:, 0]), A @ V[:, 0], rtol=1e-12, atol=1e-12)
    assert op.num_matvecs == 5 and op.inner.num_matvecs == 5
    assert op.exact_trace() == pytest.approx(SPECTRUM.sum(), rel=1e-12)
    op32 = HostOperator(DenseOperator(A.astype(np.float32)))
    assert op32.matvec(np.ones(N, dtype=np.float32)).dtype == np.float32
