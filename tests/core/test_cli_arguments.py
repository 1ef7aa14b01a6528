"""Bad command-line arguments are refused before any work, naming the flag and the fix.

Before issue 23 an ``--out`` naming an existing file failed only when the report was written,
after the whole analysis, and lost it; ``--device gpu`` gave torch's raw RuntimeError; a
compared report lacking a section gave ``KeyError``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

import pytest
from test_cli import dualhess

from dualhess._analysis import AnalysisSettings
from dualhess._report import compare
from dualhess.cli import CommandLineError, check_out_dir, main

errors_table = pytest.mark.errors_table


@errors_table
def test_out_that_is_an_existing_file(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    start = time.perf_counter()
    # frameworks hidden: the refusal comes before the demo model is even built
    proc = dualhess("analyze", "--out", str(target), block_frameworks=True)
    assert proc.returncode == 2, proc.stderr
    assert "--out" in proc.stderr and "is an existing file, not a directory" in proc.stderr
    assert "pass a directory" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_text() == "keep me"
    assert time.perf_counter() - start < 60


@errors_table
def test_out_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = dualhess("analyze", "examples/torch_mlp.py", "--out", str(afile / "report"),
                    block_frameworks=True)
    assert proc.returncode == 2, proc.stderr
    assert "--out" in proc.stderr and "is a file, not a directory" in proc.stderr


@errors_table
def test_out_that_is_not_writable(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions: simulate what a user sees
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        status = main(["analyze", "--out", str(folder / "report"), "--quiet"])
    finally:
        folder.chmod(0o755)
    assert status == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is not writable (Permission denied" in err


def test_out_that_does_not_exist_yet_is_accepted_and_not_created(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_out_dir(out) == out
    assert not (tmp_path / "a").exists()
    assert check_out_dir(tmp_path) == tmp_path  # an existing directory: files overwritten
    assert list(tmp_path.iterdir()) == []  # the write test leaves nothing behind
    with pytest.raises(CommandLineError, match="--out"):
        check_out_dir(__file__)


def _report() -> dict:
    return {
        "frameworks": ["torch"],
        "settings": {"top_k": 1},
        "results": {"torch": {
            "n": 3,
            "summary": {"lambda_max": 2.0, "lambda_min": -1.0, "negative_mass": 0.1},
            "trace": {"xtrace": {"value": 1.0}, "exact": {"value": None, "reason": "n/a"}},
            "eigenvalues": {"values": [2.0]},
            "density": {},
        }},
    }


@errors_table
def test_compare_out_that_is_an_existing_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_report()))
    target = tmp_path / "cmp.md"
    target.write_text("x")
    proc = dualhess("compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out",
                    str(target), block_frameworks=True)
    assert proc.returncode == 2, proc.stderr
    assert "--out" in proc.stderr and "is an existing file, not a directory" in proc.stderr


@errors_table
def test_compare_of_a_report_lacking_a_section(tmp_path):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps(_report()))
    broken = copy.deepcopy(_report())
    del broken["results"]["torch"]["summary"]
    del broken["settings"]
    bad.write_text(json.dumps(broken))
    assert compare(good, good)["rows"][1]["quantity"] == "lambda_max"
    with pytest.raises(ValueError, match=r"the report lacks results\.torch\.summary\.lambda_max") as info:
        compare(good, bad)
    assert str(bad) in str(info.value) and "re-run `dualhess analyze`" in str(info.value)


def test_compare_of_a_report_whose_framework_has_no_results(tmp_path):
    report = _report()
    report["frameworks"] = ["torch", "jax"]
    (tmp_path / "a.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="'frameworks' lists jax but 'results' has no such"):
        compare(tmp_path / "a.json", tmp_path / "a.json")
    report["frameworks"] = []
    (tmp_path / "a.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="names no framework results"):
        compare(tmp_path / "a.json", tmp_path / "a.json")


@errors_table
def test_device_that_is_no_device():
    with pytest.raises(ValueError, match="--device must be a device type with an optional index"):
        AnalysisSettings(device="gpu").validate()
    for good in ("cpu", "cuda", "cuda:1", "mps"):
        AnalysisSettings(device=good).validate()


def test_device_that_is_no_device_on_the_command_line(tmp_path):
    proc = dualhess("analyze", "--device", "gpu", "--out", str(tmp_path / "o"),
                    block_frameworks=True)
    assert proc.returncode != 0 and "--device must be a device type" in proc.stderr
    assert "Traceback" not in proc.stderr


@errors_table
def test_device_this_machine_lacks(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = dualhess("analyze", "examples/torch_mlp.py", "--framework", "torch", "--device",
                    "cuda:0", "--top-k", "2", "--trace-matvecs", "4", "--density-probes", "1",
                    "--density-steps", "4", "--quiet", "--no-plots", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "--device 'cuda:0' is not available on this machine" in proc.stderr, proc.stderr
    assert "pass --device cpu" in proc.stderr


@errors_table
def test_user_file_that_is_a_directory(tmp_path):
    proc = dualhess("analyze", str(tmp_path), "--no-plots", "--out", str(tmp_path / "o"),
                    block_frameworks=True)
    assert proc.returncode == 2
    assert "is a directory; pass a Python file (.py)" in proc.stderr
