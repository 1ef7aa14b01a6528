"""``method="auto"``: the engine choice (with a patched clock), and the reused graph's products."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_backend as tb  # noqa: E402
from torch_backend import _engines  # noqa: E402

CE = torch.nn.CrossEntropyLoss()


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = model.double()
    X = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    return model, X, y


def _dense(model, X, y):
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(theta):
        parts, start = {}, 0
        for name in names:
            p = params[name]
            parts[name] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return CE(torch.func.functional_call(model, parts, (X,)), y)

    return torch.autograd.functional.hessian(loss, flat)


class _FakeClock:
    """Each engine's product "takes" the seconds given for it; building takes ``build``."""

    def __init__(self, monkeypatch, seconds: dict[str, float], build: float = 0.0):
        self.now = 0.0
        self.seconds = seconds
        for name in ("func", "autograd"):
            cls = _engines.ENGINES[name]
            monkeypatch.setattr(cls, "matvec", self._slow(cls.matvec, seconds[name]))
            monkeypatch.setattr(cls, "matmat", self._slow(cls.matmat, seconds[name]))
        monkeypatch.setattr(_engines, "_clock", lambda: self.now)
        init = _engines.AutogradEngine.__init__

        def slow_init(engine, *args, **kwargs):
            init(engine, *args, **kwargs)
            self.now += build

        monkeypatch.setattr(_engines.AutogradEngine, "__init__", slow_init)

    def _slow(self, method, seconds):
        def timed(engine, x):
            self.now += seconds * (x.shape[1] if x.ndim == 2 else 1)
            return method(engine, x)

        return timed


@pytest.mark.parametrize(
    ("func", "autograd", "expected"),
    [(0.5, 1.0, "func"), (0.9, 1.0, "autograd"), (1.0, 0.85, "autograd"), (3.0, 1.0, "autograd")],
)
def test_auto_keeps_func_only_beyond_the_margin(monkeypatch, func, autograd, expected):
    model, X, y = _problem()
    clock = _FakeClock(monkeypatch, {"func": func, "autograd": autograd})
    problem, layout, selected, fixed = tb._hessian.build_objective(
        model, CE, (X, y), tb._hessian.BuildOptions(check_deterministic=False))
    v = torch.randn(layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    best, _, _, timings, _, (_, first, second) = _engines.choose_engines(
        problem, layout, selected, fixed, v, device_type="cuda")
    assert best == expected and timings["autograd"] == pytest.approx(autograd)
    assert timings["func"] == pytest.approx(func)
    # both single products of the same vector were made: they are the determinism check
    assert float(torch.linalg.norm(first - second)) <= 1e-12 * float(torch.linalg.norm(first))
    # on a CPU: autograd, no func probe (the documented rule), matmat column by column
    clock.now = 0.0
    op = tb.hessian(model, CE, (X, y))
    assert op.method == "autograd" and op.method_failures["func"].startswith("skipped")
    assert op.method_timings == pytest.approx({"autograd": autograd})
    assert op.matmat_method == "autograd (columns)"
    H = _dense(model, X, y)
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert float(torch.linalg.norm(op.matmat(V) - H @ V) / torch.linalg.norm(H @ V)) <= 1e-12
    assert float(torch.linalg.norm(op.matvec(V[:, 0]) - H @ V[:, 0])) <= 1e-12 * float(
        torch.linalg.norm(H @ V[:, 0])
    )


def test_auto_skips_func_when_autograd_beats_the_gradient(monkeypatch):
    model, X, y = _problem()
    _FakeClock(monkeypatch, {"func": 0.1, "autograd": 1.0}, build=2.0)
    problem, layout, selected, fixed = tb._hessian.build_objective(
        model, CE, (X, y), tb._hessian.BuildOptions(check_deterministic=False))
    v = torch.randn(layout.size, dtype=torch.float64)
    best, _, _, timings, failures, _ = _engines.choose_engines(
        problem, layout, selected, fixed, v, device_type="cuda")
    assert best == "autograd" and "func" not in timings
    assert "gradient graph" in failures["func"]


def test_auto_falls_back_to_func_when_autograd_fails(monkeypatch):
    model, X, y = _problem()

    def broken(engine, v):
        raise RuntimeError("double backward is not implemented for this layer")

    monkeypatch.setattr(_engines.AutogradEngine, "matvec", broken)
    op = tb.hessian(model, CE, (X, y))
    assert op.method == "func" and "not implemented" in op.method_failures["autograd"]
    H = _dense(model, X, y)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert float(torch.linalg.norm(op.matvec(v) - H @ v)) <= 1e-12 * float(torch.linalg.norm(H @ v))


def test_auto_costs_at_most_three_products(monkeypatch):
    """Construction = one graph + at most two single products (the probes and the check)."""
    model, X, y = _problem()
    calls = {"func": 0, "autograd": 0}
    for name in calls:
        cls = _engines.ENGINES[name]

        def counted(engine, v, original=cls.matvec, name=name):
            calls[name] += 1
            return original(engine, v)

        monkeypatch.setattr(cls, "matvec", counted)
        monkeypatch.setattr(cls, "matmat", lambda e, V: pytest.fail("no multi-column probe"))
    monkeypatch.setattr(_engines, "_clock", iter(np.arange(100.0)).__next__)
    tb.hessian(model, CE, (X, y))
    assert calls["autograd"] + calls["func"] <= 3
    assert calls["func"] <= 1


def test_matvec_and_matmat_chosen_separately_off_the_cpu(monkeypatch):
    """Off the CPU one batched 2-column product is timed; kept when cheaper per column."""
    model, X, y = _problem()
    plain_matvec = _engines.AutogradEngine.matvec
    clock = _FakeClock(monkeypatch, {"func": 2.0, "autograd": 1.0})
    options = tb._hessian.BuildOptions(check_deterministic=False)
    problem, layout, selected, fixed = tb._hessian.build_objective(model, CE, (X, y), options)
    v = torch.randn(layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batched = {"per_column": 0.3}
    def matmat(engine, V):
        clock.now += batched["per_column"] * V.shape[1]
        return torch.stack([plain_matvec(engine, V[:, j]) for j in range(V.shape[1])], dim=1)

    monkeypatch.setattr(_engines.AutogradEngine, "matmat", matmat)
    choice = _engines.choose_engines(problem, layout, selected, fixed, v, device_type="cuda")
    best, matmat_name, engine, timings = choice[:4]
    assert best == "autograd" and matmat_name == "autograd (batched)"
    assert timings["autograd (batched, per column)"] == pytest.approx(0.3)
    assert engine.matmat_engine is engine.matvec_engine
    batched["per_column"] = 0.9  # not below 0.8 x one single product: column by column
    slow = _engines.choose_engines(problem, layout, selected, fixed, v, device_type="cuda")
    assert slow[1] == "autograd (columns)"
    cpu = _engines.choose_engines(problem, layout, selected, fixed, v)
    assert cpu[1] == "autograd (columns)" and "autograd (batched, per column)" not in cpu[3]


def test_reused_graph_product_equals_recomputed():
    """One batch: products reuse one first-order graph; equal to a fresh graph to 1e-12."""
    model, X, y = _problem()
    op = tb.hessian(model, CE, (X, y), method="autograd")
    engine = op._engine
    assert engine._cache is not None
    rng = np.random.default_rng(3)
    for _ in range(3):  # the kept graph survives repeated products
        v = op.asarray(rng.standard_normal(op.n))
        kept = op.matvec(v)
        fresh = _engines.AutogradEngine.__new__(_engines.AutogradEngine)
        _engines._Engine.__init__(fresh, op.objective, op.layout, op.selected, op.fixed)
        fresh.batched, fresh._cache = True, None  # rebuilds the graph for every product
        recomputed = fresh.matvec(v)
        scale = float(torch.linalg.norm(recomputed))
        assert float(torch.linalg.norm(kept - recomputed)) <= 1e-12 * scale


@pytest.mark.parametrize("method", ["autograd", "func", "pyhessian"])
def test_strided_column_of_a_basis_gives_the_same_product(method):
    """Krylov bases pass strided columns; the engines copy them contiguous first."""
    model, X, y = _problem()
    op = tb.hessian(model, CE, (X, y), method=method)
    basis = torch.randn(op.n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    column = basis[:, 4]
    assert not column.is_contiguous()
    expected = _dense(model, X, y) @ column
    out = op.matvec(column)
    assert float(torch.linalg.norm(out - expected)) <= 1e-12 * float(torch.linalg.norm(expected))
    assert float(torch.linalg.norm(out - op.matvec(column.contiguous()))) == 0.0


@pytest.mark.parametrize(("batched_cost", "columns_cost", "expected"),
                         [(1.0, 3.0, "autograd (batched)"),
                          (3.0, 1.0, "autograd (columns per graph)")])
def test_auto_matmat_over_several_batches_is_timed_on_the_first_wide_call(
        monkeypatch, batched_cost, columns_cost, expected):
    """Several batches on a CPU: no graph is kept, so column by column would rebuild every
    graph per column. The first matmat of >= 8 columns runs 4 columns batched and 4 per
    graph, keeps the faster way for the rest and later calls, and spends no extra product."""
    model, X, y = _problem()
    batches = [(X[:7], y[:7]), (X[7:14], y[7:14]), (X[14:], y[14:])]
    op = tb.hessian(model, CE, batches)
    assert op.method == "autograd" and op.matmat_method.startswith("autograd (batched; timed")
    engine = op._engine.matmat_engine
    assert isinstance(engine, _engines.TimedMatmatEngine)
    now = [0.0]
    monkeypatch.setattr(_engines, "_clock", lambda: now[0])
    original = _engines.AutogradEngine.matmat
    calls = []

    def timed(self, V, *, batched=None):
        calls.append((V.shape[1], batched))
        now[0] += (batched_cost if batched is not False else columns_cost) * V.shape[1]
        return original(self, V, batched=batched)

    monkeypatch.setattr(_engines.AutogradEngine, "matmat", timed)
    V = torch.randn(op.n, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    H = _dense(model, X, y)
    out = op.matmat(V)
    assert float(torch.linalg.norm(out - H @ V)) <= 1e-12 * float(torch.linalg.norm(H @ V))
    chose_batched = expected == "autograd (batched)"
    assert calls == [(4, True), (4, False), (3, chose_batched)]  # 11 columns, 11 products
    assert op.matmat_method == expected
    assert op.method_timings["autograd (batched, per column)"] == pytest.approx(batched_cost)
    calls.clear()
    op.matmat(V[:, :2])  # later calls: the kept way, no timing
    assert calls == [(2, chose_batched)]


def test_auto_matmat_with_one_batch_stays_column_by_column_on_the_kept_graph():
    model, X, y = _problem()
    op = tb.hessian(model, CE, (X, y))
    assert op.matmat_method == "autograd (columns)"
