"""Model files that define ``closure()`` (dict batches) for ``dualhess analyze``.

The file's model takes a dict batch and returns its own mean loss over the labels it keeps
(-100 marks padding, as Hugging Face models do); ``normalizer()`` returns the kept-label count.
The analysis over three batches must equal the dense Hessian of the loss over all kept labels
of one batch holding everything.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dualhess.cli import ModelFile, load_user_file, main  # noqa: E402

MODEL_FILE = textwrap.dedent(
    """
    import torch
    import torch_backend


    class Tagger(torch.nn.Module):
        '''Token tagging from a dict batch; its forward returns the mean loss over kept labels.'''

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(7, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, input_ids, labels):
            logits = self.head(torch.tanh(self.embed(input_ids)))
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)


    def batches():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 7, (6, 5), generator=g)
        labels = torch.randint(0, 3, (6, 5), generator=g)
        labels[0, 2:] = -100  # the first batch keeps few labels
        labels[5, 1:] = -100
        return ids, labels


    def model():
        return Tagger().double()


    def closure():
        return lambda m, batch: m(**batch)


    def normalizer():
        return torch_backend.label_count()


    def data():
        ids, labels = batches()
        return [{"input_ids": ids[s], "labels": labels[s]}
                for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
    """
)


def _dense_top(path, k):
    problem = load_user_file(path)
    module = problem.model
    ids = torch.cat([b["input_ids"] for b in problem.data])
    labels = torch.cat([b["labels"] for b in problem.data])
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def loss(w):
        parts = [t.reshape(s) for t, s in zip(torch.split(w, [s.numel() for s in shapes]), shapes)]
        return torch.func.functional_call(module, dict(zip(names, parts)), (ids, labels))

    H = torch.autograd.functional.hessian(loss, flat).numpy()
    return np.sort(np.linalg.eigvalsh(H))[::-1][:k]


def test_closure_model_file_with_dict_batches_equals_the_dense_hessian(tmp_path, capsys):
    path = tmp_path / "tagger.py"
    path.write_text(MODEL_FILE)
    loaded = load_user_file(path)
    assert isinstance(loaded, ModelFile) and loaded.loss_fn is None
    assert callable(loaded.closure) and callable(loaded.normalizer)
    out = tmp_path / "report"
    rc = main(["analyze", str(path), "--top-k", "3", "--trace-matvecs", "20",
               "--density-probes", "2", "--density-steps", "10", "--no-plots", "--quiet",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    # no JAX twin for a closure, and the report says why (not an error without --framework)
    assert report["frameworks"] == ["torch"]
    assert "closure(model, batch) loss has no twin" in report["model"]["twin_error"]
    assert "no crosscheck" in printed
    values = np.asarray(report["results"]["torch"]["eigenvalues"]["values"])
    top = _dense_top(path, 3)
    err = float(np.max(np.abs(values - top)) / abs(top[0]))
    print(f"closure() model file, 3 dict batches vs dense single batch: rel err {err:.2e}")
    assert err <= 1e-10


def test_closure_model_file_asked_for_both_frameworks_is_an_error(tmp_path):
    path = tmp_path / "tagger.py"
    path.write_text(MODEL_FILE)
    with pytest.raises(NotImplementedError, match="closure"):
        main(["analyze", str(path), "--framework", "both", "--top-k", "1", "--no-plots",
              "--quiet", "--debug", "--out", str(tmp_path / "r")])


@pytest.mark.errors_table
def test_model_file_with_both_loss_and_closure_is_refused(tmp_path, capsys):
    path = tmp_path / "both.py"
    path.write_text(MODEL_FILE + "\ndef loss():\n    return torch.nn.CrossEntropyLoss()\n")
    rc = main(["analyze", str(path), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "defines both loss() and closure()" in capsys.readouterr().err


@pytest.mark.errors_table
def test_model_file_closure_that_returns_no_function_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(MODEL_FILE.replace("return lambda m, batch: m(**batch)", "return 3.14"))
    rc = main(["analyze", str(path), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "closure() returned float, not a function" in capsys.readouterr().err


def test_float32_model_analysed_as_a_float64_copy_says_so(tmp_path, capsys):
    path = tmp_path / "tagger32.py"
    path.write_text(MODEL_FILE.replace("return Tagger().double()", "return Tagger()"))
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--framework", "torch", "--top-k", "1",
                 "--trace-matvecs", "10", "--density-probes", "1", "--density-steps", "5",
                 "--no-plots", "--quiet", "--out", str(out)]) == 0
    note = "the float32 model was analysed as a float64 copy"
    assert note in capsys.readouterr().out
    assert note in (out / "report.md").read_text()
    model = json.loads((out / "report.json").read_text())["model"]
    assert model["dtype"] == "float32" and note in model["dtype_note"]
    # analysed in its own precision: no note
    assert main(["analyze", str(path), "--framework", "torch", "--dtype", "float32",
                 "--top-k", "1", "--trace-matvecs", "10", "--density-probes", "1",
                 "--density-steps", "5", "--no-plots", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["model"]["dtype_note"] is None


def test_a_missing_twin_framework_is_named_not_a_silent_null(monkeypatch):
    """The owner's ``twinned_by`` names the backend whose absence the analysis reports."""
    import dualhess.backends as backends
    from dualhess._analysis import AnalysisSettings, analyze

    real = backends.get_backend

    def without_jax(name):
        if name == "jax":
            raise ImportError("No module named 'jax' (hidden by the test)")
        return real(name)

    monkeypatch.setattr(backends, "get_backend", without_jax)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = (torch.randn(12, 3), torch.randint(0, 2, (12,)))
    out = analyze(model.double(), torch.nn.CrossEntropyLoss(), data,
                  AnalysisSettings(top_k=1, trace_matvecs=6, density_probes=1, density_steps=4,
                                   progress=False))
    assert out["frameworks"] == ["torch"]
    assert out["model"]["twin_error"] == "JAX not installed (pip install 'dualhess[jax]')"
