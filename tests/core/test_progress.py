"""What ``dualhess analyze`` shows a person on stderr, and its ``--landscape`` report.

The CLI runs in-process with stderr captured. On a (fake) terminal the bars are drawn with
carriage returns; :func:`screen` replays them as a terminal would, and every step message
must then stand on its own line, never glued to a bar. Off a terminal (a pipe, a log file,
``make run > log``) there are no bars, only the messages, one per line; ``--quiet`` prints
nothing on stderr.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--top-k", "3", "--trace-matvecs", "20", "--density-probes", "2",
         "--density-steps", "15", "--no-plots"]


class Terminal(io.StringIO):
    """A captured stderr that says it is a terminal, so tqdm draws its bars."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows: each carriage return goes back to column 0 and the text
    after it overwrites what was there."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for piece in raw.split("\r"):
            shown = piece + shown[len(piece):]
        lines.append(shown.rstrip())
    return lines


def run(monkeypatch, capsys, *args: str, stderr: io.StringIO | None = None) -> tuple[int, str]:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from dualhess.cli import main

    fake = stderr if stderr is not None else io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    code = main(["analyze", str(ROOT / "examples" / "torch_mlp.py"), *args])
    monkeypatch.undo()
    capsys.readouterr()
    return code, fake.getvalue()


MESSAGES = ("[torch] top-3 eigenvalues", "[torch] smallest eigenvalue", "[torch] trace (XTrace",
            "[torch] spectral density", "[torch] gradient overlap")


def test_bars_on_a_terminal_never_break_a_log_line(monkeypatch, capsys, tmp_path):
    code, err = run(monkeypatch, capsys, *SMALL, "--framework", "torch", "--out",
                    str(tmp_path), stderr=Terminal())
    assert code == 0
    # one bar per stage, each with a total that means something
    assert "eigsh: 0/3 pairs converged" in err
    assert "trace (xtrace): 0/20 products" in err
    assert "density (2 probes x Lanczos): 0/15 steps" in err
    assert "it/s" not in err and "/2000" not in err
    shown = screen(err)
    for message in MESSAGES:
        hits = [line for line in shown if message in line]
        assert len(hits) == 1 and hits[0].startswith(message), (message, hits)
    # bars are cleared when their stage ends: none is left on the screen
    assert not [line for line in shown if "|" in line and ("converged" in line
                                                           or "products" in line)]


def test_no_bars_off_a_terminal(monkeypatch, capsys, tmp_path):
    code, err = run(monkeypatch, capsys, *SMALL, "--framework", "torch", "--out",
                    str(tmp_path / "a"))
    assert code == 0 and "\r" not in err
    lines = err.splitlines()
    for message in MESSAGES:
        assert sum(line.startswith(message) for line in lines) == 1, message


@pytest.mark.both
def test_landscape_and_gradient_overlap_in_the_report(monkeypatch, capsys, tmp_path):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    import matplotlib.image

    # in-process, jax may be imported already: JAX_ENABLE_X64 from the CLI comes too late
    jax.config.update("jax_enable_x64", True)

    import dualhess
    from dualhess._report import missing_keys

    out = tmp_path / "report"
    args = [a for a in SMALL if a != "--no-plots"]
    code, err = run(monkeypatch, capsys, *args, "--landscape", "--landscape-radius", "0.01",
                    "--landscape-points", "5", "--out", str(out))
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert missing_keys(report) == [] and "landscape.png" in report["files"]
    image = matplotlib.image.imread(out / "landscape.png")
    assert image.ndim == 3 and image.shape[0] > 200
    assert "landscape.png" in (out / "report.md").read_text()
    res_t, res_j = report["results"]["torch"], report["results"]["jax"]
    land_t, land_j = res_t["landscape"], res_j["landscape"]
    # identical directions (one sign rule) in both frameworks: the same slice
    np.testing.assert_allclose(land_j["values"], land_t["values"], rtol=1e-12)
    # against direct evaluations of the user's model at theta + t v_1
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import torch_mlp
    finally:
        sys.path.pop(0)
    model, loss_fn, (X, y) = torch_mlp.model().double(), torch_mlp.loss(), torch_mlp.data()
    op = dualhess.hessian(model, loss_fn, (X.double(), y), dtype="float64")
    eig = dualhess.eigsh(op, k=1, tol=1e-12, seed=0)
    v = eig.vectors[:, 0].numpy()
    v = v if v[np.argmax(np.abs(v))] > 0 else -v
    theta = op.params_flat.numpy()
    for t, value in zip(land_t["offsets"][0], land_t["values"]):
        shifted = op.layout.split(torch.from_numpy(theta + t * v))
        with torch.no_grad():
            direct = float(loss_fn(torch.func.functional_call(model, shifted, (X.double(),)), y))
        assert value == pytest.approx(direct, rel=1e-10)
    assert land_t["center_loss"] == pytest.approx(op.loss, rel=1e-14)
    # second difference at 0 with h = 0.005: lambda_max to O(h^2)
    assert land_t["curvature"] == pytest.approx(res_t["summary"]["lambda_max"], rel=1e-4)
    # the gradient overlap with the top-3 eigenspace, the same in both frameworks
    over_t, over_j = res_t["gradient_overlap"], res_j["gradient_overlap"]
    assert over_t["k"] == 3 and 0.0 <= over_t["value"] <= 1.0
    assert over_j["value"] == pytest.approx(over_t["value"], rel=1e-8)
    assert report["agreement"]["landscape_max_abs_diff"] <= 1e-12 * max(land_t["values"])


def test_per_layer_writes_block_densities(monkeypatch, capsys, tmp_path):
    out = tmp_path / "report"
    args = [a for a in SMALL if a != "--no-plots"]
    code, err = run(monkeypatch, capsys, *args, "--framework", "torch", "--per-layer", "--quiet",
                    "--out", str(out), stderr=Terminal())
    assert code == 0 and err == ""  # --quiet: nothing on stderr, even on a terminal
    report = json.loads((out / "report.json").read_text())
    assert {"per_layer.png", "per_layer_density.png"} <= set(report["files"])
    per_layer = report["per_layer"]
    assert per_layer["distances"]["names"] == ["0", "2"] == list(per_layer["densities"])
    D = np.asarray(per_layer["distances"]["jensen_shannon"])
    assert np.allclose(D, D.T) and np.all(np.diag(D) == 0) and 0 < D[0, 1] <= 1
    for dens in per_layer["densities"].values():
        grid, values = np.asarray(dens["grid"]), np.asarray(dens["values"])
        assert np.sum(np.diff(grid) * (values[1:] + values[:-1])) / 2 == pytest.approx(1.0)
    assert "per_layer_density.png" in (out / "report.md").read_text()


# ---------------------------------------------------------------------- bars that move
class TimedTerminal(Terminal):
    """A terminal that records when each piece of text arrived, for replaying."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        import time

        self.events.append((time.perf_counter(), text))
        return super().write(text)


def frames(events: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Each redraw of a bar (the text after a carriage return) with its time."""
    out = []
    for t, text in events:
        for piece in text.split("\r")[1:]:
            if piece.strip():
                out.append((t, piece.strip()))
    return out


def test_a_bar_draws_every_step_and_moves_during_slow_steps(monkeypatch):
    """Fast first steps, then slow ones: tqdm's adaptive skipping used to freeze such a bar
    (the density bar stood at 18/60 for ~10 s, then jumped to 54/60). Replayed, the bar must
    show every step count and be redrawn at least every ~second while a step runs."""
    import re
    import time

    import dualhess
    from dualhess._util import TICK_SECONDS

    class FastThenSlow(dualhess.DenseOperator):
        def _matvec(self, v):
            if self.num_matvecs >= 12:
                time.sleep(0.3)
            return super()._matvec(v)

    A = np.diag(np.linspace(1.0, 2.0, 40))
    term = TimedTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    start = time.perf_counter()
    dualhess.lanczos(FastThenSlow(A), num_steps=20, seed=0, progress="replayed")
    end = time.perf_counter()
    monkeypatch.undo()
    shown = frames(term.events)
    counts = [int(m.group(1)) for _, f in shown if (m := re.match(r"replayed: (\d+)/20", f))]
    assert counts[0] == 0 and counts == sorted(counts)
    # every slow step is drawn (fast ones may share a redraw: 0.2 s between redraws)
    assert set(range(13, 21)) <= set(counts), sorted(set(range(13, 21)) - set(counts))
    times = [start] + [t for t, _ in shown] + [end]
    gaps = np.diff(times)
    print(f"{len(shown)} redraws over {end - start:.1f} s, longest gap {gaps.max():.2f} s "
          f"(ticker every {TICK_SECONDS} s)")
    assert gaps.max() <= 4 * TICK_SECONDS  # a step takes 0.3 s; redraws at least every 2 s
    assert screen(term.getvalue())[-1] == ""  # cleared when done


def test_the_first_line_comes_at_once_on_a_terminal(tmp_path):
    """`dualhess analyze FILE` on a real pseudo-terminal: the first line comes before the
    frameworks are imported (measured ~0.2 s; the target is 1 s, the bound here 2 s for a
    loaded machine), then a line per stage."""
    pty = pytest.importorskip("pty")
    pytest.importorskip("torch")
    import os
    import select
    import subprocess
    import time

    master, slave = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualhess", "analyze", str(ROOT / "examples" / "torch_mlp.py"),
         "--framework", "torch", *SMALL, "--out", str(tmp_path)],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    os.close(slave)
    events = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                events.append((time.perf_counter() - start, data.decode(errors="replace")))
            elif proc.poll() is not None:
                break
            if time.perf_counter() - start > 300:
                proc.kill()
                pytest.fail("dualhess analyze did not finish in 300 s")
    finally:
        os.close(master)
    assert proc.wait() == 0, "".join(t for _, t in events)
    first_time, first_text = events[0]
    print(f"first line after {first_time:.2f} s: {first_text.strip()!r}")
    assert first_text.startswith("dualhess analyze: ") and "torch_mlp.py" in first_text
    assert first_time <= 2.0
    text = "".join(t for _, t in events)
    assert "[torch] building the Hessian operator" in text
    # bars drawn on a terminal that reports zero columns (a fresh pseudo-terminal)
    assert "eigsh: 0/3 pairs converged" in text and "density (2 probes x Lanczos)" in text
