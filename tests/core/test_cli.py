"""`dualhess` end to end, in subprocesses: help, user files, analyze, compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dualhess._report import REPORT_FILES, missing_keys

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("torch", "jax", "jaxlib", "flax", "optax", "torch_backend", "jax_backend",
               "matplotlib")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    sys.meta_path.insert(0, Block())
    from dualhess.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def dualhess(*args: str, cwd: Path = ROOT, block_frameworks: bool = False, timeout: int = 600):
    cmd = [sys.executable, "-c", BLOCKER, *args] if block_frameworks else [
        sys.executable, "-m", "dualhess", *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------- help
def test_help_explains_every_option_without_frameworks():
    proc = dualhess("analyze", "--help", block_frameworks=True)
    assert proc.returncode == 0, proc.stderr
    for option in ("--framework", "--top-k", "--trace-matvecs", "--density-probes",
                   "--density-steps", "--seed", "--dtype", "--device", "--out", "--params",
                   "--no-plots", "--quiet", "model()", "loss()", "data()"):
        assert option in proc.stdout, option
    top = dualhess("--help", block_frameworks=True)
    assert top.returncode == 0 and "analyze" in top.stdout and "compare" in top.stdout
    cmp = dualhess("compare", "--help", block_frameworks=True)
    assert cmp.returncode == 0 and "--labels" in cmp.stdout


def test_bad_option_value_is_rejected():
    proc = dualhess("analyze", "--top-k", "0", block_frameworks=True)
    assert proc.returncode == 2
    assert "--top-k" in proc.stderr and "positive integer" in proc.stderr


# ---------------------------------------------------------------------- user files
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("def model():\n    raise RuntimeError('no weights here')\n"
         "def loss():\n    return None\ndef data():\n    return None\n",
         "model() raised RuntimeError: no weights here"),
        ("import numpy\nraise ValueError('broken at import')\n",
         "importing the file raised ValueError: broken at import"),
        ("def model():\n    return 1\ndef loss():\n    return 1\n"
         "def data():\n    return {}['missing']\n",
         "data() raised KeyError: 'missing'"),
    ],
)
def test_user_file_that_raises(tmp_path, body, expected):
    path = tmp_path / "user_model.py"
    path.write_text(body)
    proc = dualhess("analyze", str(path), "--out", str(tmp_path / "out"), block_frameworks=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "user_model.py" in lines[0] and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_user_file_with_a_wrong_signature_says_what_each_function_returns(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text("def model():\n    return 1\ndef loss(logits, labels):\n    return 0.0\n"
                    "def data():\n    return None\n")
    proc = dualhess("analyze", str(path), "--out", str(tmp_path / "out"), block_frameworks=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "loss(logits, labels) takes arguments" in line
    for returns in ("model() the model", "loss() the loss function itself", "data() a batch"):
        assert returns in line
    assert not (tmp_path / "out").exists()


def test_user_file_missing_data(tmp_path):
    path = tmp_path / "no_data.py"
    path.write_text("def model():\n    return 1\ndef loss():\n    return 1\n")
    proc = dualhess("analyze", str(path), block_frameworks=True)
    assert proc.returncode != 0
    assert "no_data.py does not define data()" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text("def model():\n    raise RuntimeError('boom')\ndef loss():\n    pass\n"
                    "def data():\n    pass\n")
    proc = dualhess("analyze", str(path), "--debug", block_frameworks=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "boom" in proc.stderr


def test_missing_file_and_bad_report(tmp_path):
    proc = dualhess("analyze", str(tmp_path / "nope.py"), block_frameworks=True)
    assert proc.returncode != 0 and "nope.py: no such file" in proc.stderr
    (tmp_path / "bad.json").write_text("{}")
    proc = dualhess("compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json"),
                    block_frameworks=True)
    assert proc.returncode != 0 and "not a dualhess report.json" in proc.stderr


# ---------------------------------------------------------------------- end to end
SMALL = ("--top-k", "3", "--trace-matvecs", "20", "--density-probes", "2",
         "--density-steps", "15", "--quiet")


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    out = tmp_path_factory.mktemp("analyze") / "report"
    proc = dualhess("analyze", "examples/torch_mlp.py", *SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.mark.both
def test_analyze_end_to_end(torch_run):
    import matplotlib.image

    out, proc = torch_run
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    report = json.loads((out / "report.json").read_text())
    assert missing_keys(report) == []
    assert report["frameworks"] == ["torch", "jax"]
    assert report["seed"] == 0 and report["settings"]["top_k"] == 3
    assert {"python", "numpy", "dualhess", "torch", "jax", "flax"} <= set(report["versions"])
    for name in ("density.png", "eigenvalues.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    md = (out / "report.md").read_text()
    assert "![" in md and "density.png" in md and "eigenvalues.png" in md
    # the printed table
    assert "lambda_max" in proc.stdout and "torch" in proc.stdout and "jax" in proc.stdout

    # the two frameworks agree (float64): top eigenvalues to 1e-8 relative
    torch_res, jax_res = report["results"]["torch"], report["results"]["jax"]
    vt = np.asarray(torch_res["eigenvalues"]["values"])
    vj = np.asarray(jax_res["eigenvalues"]["values"])
    assert all(torch_res["eigenvalues"]["converged"]) and all(jax_res["eigenvalues"]["converged"])
    np.testing.assert_allclose(vj, vt, rtol=1e-8)
    assert vt[0] == max(vt) and torch_res["n"] == jax_res["n"] == 8 * 64 + 8 + 10 * 8 + 10
    assert report["crosscheck"]["passed"], report["crosscheck"]["summary"]
    assert report["agreement"]["passed"]
    assert jax_res["trace"]["xtrace"]["value"] == pytest.approx(
        torch_res["trace"]["xtrace"]["value"], rel=1e-8)
    np.testing.assert_allclose(jax_res["density"]["values"], torch_res["density"]["values"],
                               rtol=1e-6, atol=1e-8 * max(torch_res["density"]["values"]))
    # BackPACK's exact trace on the torch side; none in JAX, with the reason
    assert isinstance(torch_res["trace"]["exact"]["value"], float)
    assert jax_res["trace"]["exact"]["value"] is None and jax_res["trace"]["exact"]["reason"]
    # a reason, not API advice on every JAX run; which trace to quote
    assert "use a stochastic" not in jax_res["trace"]["exact"]["reason"]
    assert "The trace to quote is the exact trace" in md
    assert "Hutchinson traces below" in md
    assert torch_res["summary"]["lambda_min"] <= vt[-1]


@pytest.mark.both
def test_compare_cli_on_two_reports(torch_run, tmp_path):
    out, _ = torch_run
    report = json.loads((out / "report.json").read_text())
    for res in report["results"].values():  # a "second run" with every eigenvalue doubled
        res["eigenvalues"]["values"] = [2 * v for v in res["eigenvalues"]["values"]]
        res["summary"]["lambda_max"] *= 2
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "report.json").write_text(json.dumps(report))
    proc = dualhess("compare", str(out / "report.json"), str(tmp_path / "B"), "--out",
                    str(tmp_path / "C"), "--labels", "before", "after", "--framework", "jax")
    assert proc.returncode == 0, proc.stderr
    assert "before (jax)" in proc.stdout and "after (jax)" in proc.stdout
    result = json.loads((tmp_path / "C" / "compare.json").read_text())
    rows = {r["quantity"]: r for r in result["rows"]}
    lam = report["results"]["jax"]["summary"]["lambda_max"] / 2
    assert rows["lambda_max"]["diff"] == pytest.approx(lam, rel=1e-12)
    assert rows["trace (XTrace)"]["diff"] == 0.0
    for name in ("compare.md", "density.png", "eigenvalues.png"):
        assert (tmp_path / "C" / name).stat().st_size > 0


TRANSFORMER_FILE = '''
import torch
from torch import nn

class SortedFeatures(nn.Module):  # aten.sort: an operator the JAX twin has no rule for
    def forward(self, x):
        return x.sort(dim=-1).values

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), SortedFeatures(), nn.Tanh(), nn.Linear(6, 3)).eval()

def loss():
    return nn.CrossEntropyLoss()
'''


@pytest.mark.both
def test_model_without_a_twin_is_analysed_in_torch_and_says_why(tmp_path):
    """An operator the JAX twin has no rule for: by default the PyTorch analysis goes on and
    the report says why there is no crosscheck; --framework both makes it an error."""
    path = tmp_path / "transformer.py"
    path.write_text(TRANSFORMER_FILE)
    out = tmp_path / "report"
    proc = dualhess("analyze", str(path), *SMALL, "--no-plots", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no crosscheck: the JAX twin could not be built (UnsupportedOpError" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["frameworks"] == ["torch"] and report["crosscheck"] is None
    assert "aten.sort" in report["model"]["twin_error"]
    assert all(report["results"]["torch"]["eigenvalues"]["converged"])
    assert "Not run: the JAX twin could not be built" in (out / "report.md").read_text()

    strict = dualhess("analyze", str(path), *SMALL, "--framework", "both", "--out",
                      str(tmp_path / "strict"))
    assert strict.returncode != 0
    assert "aten.sort" in strict.stderr and "Traceback" not in strict.stderr
