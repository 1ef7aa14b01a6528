"""Install check: the built wheel, installed alone per extra into fresh venvs, works.

For each extra asked for (default: core, torch, jax, all), this script creates a fresh venv in a
temporary folder, installs the wheel built from this checkout (``pip wheel``, PEP 517, the
same build as ``python -m build``) with that extra and ``-c constraints.txt``, and runs:

* ``core``: ``dualhess --help``, and ``dualhess analyze`` must fail in one line naming
  ``pip install 'dualhess[torch]'`` (the demo is a PyTorch model);
* ``torch``: ``dualhess analyze .ci/install_check/torch_model.py --framework torch`` and plain
  ``dualhess analyze FILE`` (both frameworks by default) with short settings must write
  report.json and report.md; without JAX, matplotlib and scikit-learn, the report must say
  "JAX not installed (pip install 'dualhess[jax]')" and that the figures were skipped, and
  the demo must name scikit-learn in one line;
* ``jax``: the Flax model file, ``--framework jax``, must write a report;
* ``all``: the demo itself (``dualhess analyze``, short settings) in both frameworks, with
  its figures.

Usage: python .ci/test_install.py [core] [torch] [jax] [all]    (exit status 1 on a failure)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".ci" / "install_check"
SHORT = ["--top-k", "2", "--trace-matvecs", "10", "--density-probes", "2",
         "--density-steps", "10", "--quiet"]
JAX_HINT = "JAX not installed (pip install 'dualhess[jax]')"


def run(cmd: list[str], *, cwd: Path, expect: int | None = 0) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    print(f"  $ {' '.join(str(c) for c in cmd)}  -> {proc.returncode} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit status {proc.returncode}, expected {expect}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def check(condition: bool, what: str, proc: subprocess.CompletedProcess | None = None) -> None:
    if not condition:
        detail = "" if proc is None else f"\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        raise AssertionError(what + detail)
    print(f"  ok: {what}", flush=True)


def report_of(out: Path) -> tuple[dict, str]:
    check((out / "report.json").is_file() and (out / "report.md").is_file(),
          f"report.json and report.md written to {out.name}/")
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def check_core(bin_dir: Path, work: Path) -> None:
    run([bin_dir / "dualhess", "--help"], cwd=work)
    proc = run([bin_dir / "dualhess", "analyze", "--out", work / "r"], cwd=work, expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dualhess: error")]
    check(len(errors) == 1 and "pip install 'dualhess[torch]'" in errors[0],
          "without a framework, analyze fails in one line with the pip command", proc)


def check_torch(bin_dir: Path, work: Path) -> None:
    model = MODELS / "torch_model.py"
    run([bin_dir / "dualhess", "analyze", model, "--framework", "torch", "--out", work / "t",
         *SHORT], cwd=work)
    report, md = report_of(work / "t")
    check(report["frameworks"] == ["torch"], "--framework torch: analysed in torch")
    check("matplotlib" in (report["figures_skipped"] or "") and "Figures skipped" in md,
          "no matplotlib: the figures are listed as skipped with the pip command")
    proc = run([bin_dir / "dualhess", "analyze", model, "--out", work / "d", *SHORT[:-1]],
               cwd=work)
    report, md = report_of(work / "d")
    check(report["model"]["twin_error"] == JAX_HINT and JAX_HINT in md
          and JAX_HINT in proc.stdout and JAX_HINT in proc.stderr,
          "no JAX: table, stderr, report.md and report.json say so", proc)
    proc = run([bin_dir / "dualhess", "analyze", "--framework", "torch", "--out", work / "demo",
                *SHORT[:-1]], cwd=work, expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dualhess: error")]
    check(len(errors) == 1 and "pip install scikit-learn" in errors[0],
          "no scikit-learn: the demo names it in one line", proc)


def check_jax(bin_dir: Path, work: Path) -> None:
    run([bin_dir / "dualhess", "analyze", MODELS / "flax_model.py", "--framework", "jax",
         "--out", work / "j", *SHORT], cwd=work)
    report, _ = report_of(work / "j")
    check(report["frameworks"] == ["jax"], "--framework jax: analysed in JAX")


def check_all(bin_dir: Path, work: Path) -> None:
    run([bin_dir / "dualhess", "analyze", "--out", work / "a", *SHORT], cwd=work)
    report, _ = report_of(work / "a")
    check(report["frameworks"] == ["torch", "jax"] and (work / "a" / "density.png").is_file(),
          "the demo in both frameworks, with its figures")


CHECKS = {"core": check_core, "torch": check_torch, "jax": check_jax, "all": check_all}


def main(extras: list[str]) -> int:
    extras = extras or ["core", "torch", "jax", "all"]
    unknown = [e for e in extras if e not in CHECKS]
    if unknown:
        print(f"unknown extra(s) {unknown}; choose from {list(CHECKS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dualhess-install-") as tmp:
        tmp_path = Path(tmp)
        print("building the wheel", flush=True)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist",
             ROOT], cwd=tmp_path)
        (wheel,) = (tmp_path / "dist").glob("dualhess-*.whl")
        failures = []
        for extra in extras:
            started = time.perf_counter()
            print(f"[{extra}] fresh venv, pip install {wheel.name}"
                  + ("" if extra == "core" else f"[{extra}]"), flush=True)
            env_dir = tmp_path / f"venv-{extra}"
            venv.create(env_dir, with_pip=True)
            bin_dir = env_dir / "bin"
            requirement = f"{wheel}" if extra == "core" else f"dualhess[{extra}] @ {wheel.as_uri()}"
            try:
                run([bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     "-c", ROOT / "constraints.txt", requirement], cwd=tmp_path)
                if extra != "core":
                    run([bin_dir / "python", ROOT / ".ci" / "drop_broken_torchvision.py"],
                        cwd=tmp_path)
                work = tmp_path / f"work-{extra}"
                work.mkdir()
                CHECKS[extra](bin_dir, work)
            except AssertionError as exc:
                failures.append(extra)
                print(f"[{extra}] FAILED: {exc}", flush=True)
            print(f"[{extra}] {time.perf_counter() - started:.0f} s", flush=True)
    if failures:
        print(f"install check failed for: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"install check passed: {', '.join(extras)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
