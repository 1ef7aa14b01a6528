"""Checkpoint and resume: SIGKILL a run after N products, re-run, get the uninterrupted result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dualhess
from dualhess import DenseOperator
from dualhess._checkpoint import CheckpointMismatchError

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import dualhess

    class Killable(dualhess.DenseOperator):
        kill_after = None
        def _matmat(self, V):
            if self.kill_after is not None and self.num_matvecs + V.shape[1] > self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)   # dies like a preempted job
            return self.matrix @ V
        def _matvec(self, v):
            return self._matmat(v[:, None])[:, 0]

    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    lam = np.concatenate([[30.0, 20.0, 15.0, -25.0], rng.uniform(-1, 1, 116)])
    op = Killable((Q * lam) @ Q.T)
    what, path, kill_after = sys.argv[1], sys.argv[2], sys.argv[3]
    op.kill_after = None if kill_after == "none" else int(kill_after)
    path = None if path == "none" else path
    if what == "eigsh":
        r = dualhess.eigsh(op, k=3, which="BE", tol=1e-10, max_basis=10, seed=3,
                           checkpoint=path, checkpoint_every=4)
        out = {"values": r.values.tolist(), "residuals": r.residuals.tolist(), "n": r.num_matvecs}
    elif what == "eigsh-block":
        r = dualhess.eigsh(op, k=3, which="LA", tol=1e-10, seed=3, block_size=4,
                           checkpoint=path, checkpoint_every=6)
        out = {"values": r.values.tolist(), "residuals": r.residuals.tolist(), "n": r.num_matvecs}
    elif what == "lanczos":
        r = dualhess.lanczos(op, 25, num_probes=3, seed=3, checkpoint=path, checkpoint_every=5)
        out = {"alpha": r.alpha.tolist(), "beta": r.beta.tolist(), "n": r.num_matvecs}
    elif what == "density":
        r = dualhess.density(op, num_probes=4, num_steps=20, seed=3, checkpoint=path, checkpoint_every=8)
        out = {"nodes": r.nodes.tolist(), "weights": r.weights.tolist(), "n": r.num_matvecs}
    else:
        r = dualhess.trace(op, method=what, num_matvecs=40, seed=3, checkpoint=path, checkpoint_every=6)
        out = {"value": r.value, "stderr": r.stderr, "n": r.num_matvecs}
    out["computed"] = op.num_matvecs   # products actually computed in this process
    print(json.dumps(out))
    """
)

CASES = ["eigsh", "eigsh-block", "lanczos", "density", "xtrace", "hutch++"]


def _run(what: str, path, kill_after) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, what, str(path), str(kill_after)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("what", CASES)
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, what):
    reference = _run(what, tmp_path / "ref.npz", "none")
    assert reference.returncode == 0, reference.stderr
    ref = json.loads(reference.stdout)
    assert not (tmp_path / "ref.npz").exists()  # removed after a completed run
    kill_after = ref["computed"] * 2 // 3 + 1  # past at least one save, before the end

    path = tmp_path / "run.npz"
    killed = _run(what, path, kill_after)
    assert killed.returncode == -signal.SIGKILL
    assert path.exists()  # the checkpoint survived the kill
    resumed = _run(what, path, "none")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["computed"] < ref["computed"]  # it really resumed: fewer products computed
    computed_before = got.pop("computed"), ref.pop("computed")
    assert got == ref, computed_before  # exactly the uninterrupted result, num_matvecs included
    assert not path.exists()

    plain = json.loads(_run(what, "none", "none").stdout)  # no checkpoint at all
    for key, value in ref.items():
        np.testing.assert_allclose(plain[key], value, rtol=1e-12, atol=1e-12)


def test_checkpoint_of_other_settings_or_operator_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    A = np.diag(np.arange(1.0, 31.0))

    class Crash(DenseOperator):
        limit = None

        def _matmat(self, V):
            if self.limit is not None and self.num_matvecs >= self.limit:
                raise RuntimeError("interrupted")  # mid-run: the checkpoint stays
            return self.matrix @ V

        def _matvec(self, v):
            return self._matmat(v[:, None])[:, 0]

    crashing = Crash(A)
    crashing.limit = 12
    with pytest.raises(RuntimeError, match="interrupted"):
        dualhess.lanczos(crashing, 20, seed=0, checkpoint=path, checkpoint_every=4)
    assert path.exists()
    with pytest.raises(CheckpointMismatchError, match="its settings is"):
        dualhess.lanczos(Crash(A), 21, seed=0, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="its operator is 'Crash'"):
        dualhess.lanczos(DenseOperator(A), 20, seed=0, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="another operator"):
        dualhess.lanczos(Crash(2 * A), 20, seed=0, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="its kind is 'lanczos'"):
        dualhess.trace(Crash(A), seed=0, checkpoint=path)
    # the right call resumes and finishes
    resumed = Crash(A)
    T = dualhess.lanczos(resumed, 20, seed=0, checkpoint=path, checkpoint_every=4)
    assert T.num_matvecs == 20 and not path.exists()
    assert resumed.num_matvecs == 20 - 12  # only the missing products were computed
    with pytest.raises(ValueError, match="integer seed"):
        dualhess.eigsh(DenseOperator(A), k=2, seed=None, checkpoint=tmp_path / "d.npz")


class _Diagonal(dualhess.Operator):
    """A large diagonal operator whose products allocate only their output."""

    def __init__(self, d):
        super().__init__((d.shape[0], d.shape[0]), np.float64)
        self.d = d

    def _matmat(self, V):
        return self.d[:, None] * V


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_eigsh_peak_memory_is_flat_in_the_number_of_steps():
    """Thick restart keeps at most max_basis vectors: 10x more steps, the same peak memory."""
    import warnings

    n = 20000
    d = np.random.default_rng(0).uniform(-1.0, 1.0, n)
    op = _Diagonal(d)

    def run(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dualhess.NotConvergedWarning)
            return dualhess.eigsh(op, k=4, max_basis=12, tol=0.0, max_matvecs=steps, seed=0)

    short, long = _peak_bytes(lambda: run(60)), _peak_bytes(lambda: run(600))
    basis_bytes = 12 * n * 8
    assert long <= 1.15 * short, (short, long)
    assert long <= 6 * basis_bytes  # a few copies of the bounded basis, not 600 vectors
    # contrast: plain Lanczos keeps every vector, so its memory grows with the steps
    lanczos_peak = _peak_bytes(lambda: dualhess.lanczos(op, 120, seed=0))
    assert lanczos_peak >= 100 * n * 8
