"""Equal accuracy, density speed, peak memory and the JAX product: dualhess against its peers.

``python -m benchmarks.parity`` writes ``benchmarks/results/parity.{json,md}``. Four parts, each
measured in one run on this machine (the load average is recorded with the results):

* **Products at equal accuracy** (top-5, float64): the digits MLP (64-150-10, 11,260
  parameters, 512 digits) and a ResNet-18 with BatchNorm (width 6, 99,616 parameters,
  3 x 16 x 16 inputs, batch 64). The reference is dualhess's eigsh at ``tol=1e-13``. For each of
  five start-vector seeds: dualhess ``eigsh(tol=t)`` (``criterion="eigenvalue"``, the default;
  and ``"residual"`` for comparison) against hessian-eigenthings' Lanczos with ``max_iter``
  chosen by an oracle: its Lanczos (full reorthogonalisation) is run once to 60 steps and
  the smallest ``j`` whose top-5 Ritz values are within ``t`` of the reference is its count
  (the tridiagonal of ``max_iter=j`` is the leading ``j x j`` block of the one of 60).
  Error: ``max_i |theta_i - lambda_i| / |lambda_1|``.
* **Density speed**: 10 probes x 60 Lanczos steps on a 97,260-parameter digits MLP (float32)
  for dualhess, PyHessian (its ``density`` calls the removed ``torch.eig``; a shim with
  ``torch.linalg.eigh`` stands in, outside the timed products), hessian-eigenthings and
  curvlinops; wall and process CPU time, one run each after a warm-up product.
* **Peak memory**: top-5 to 1e-3 on a ~1M-parameter GPT-2 LM (float32, 8 x 64 tokens), each
  tool in a fresh process; the peak resident set size above the one after the model, data and
  one gradient (``benchmarks.scale.PeakRSS``, sampled every 2 ms).
* **The JAX product**: MLPs of ~1e5 and ~1e6 parameters (float32, batch 256), median times of
  a jitted gradient, a jitted ``jvp(grad)`` of the same loss, and dualhess's JAX operator, timed in interleaved
  rounds (this machine's speed drifts by up to 5x over seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.realistic import _Clock
from benchmarks.scale import PeakRSS

RESULTS = Path(__file__).parent / "results"
K = 5
TARGETS = (1e-3, 1e-6)
SEEDS = (0, 1, 2, 3, 4)
ORACLE_STEPS = 60


# ---------------------------------------------------------------------- problems
def _digits_mlp(sizes: tuple[int, ...], dtype: Any) -> Any:
    import torch

    from benchmarks.models import Task, load_digits, make_model

    X, y = load_digits(512)
    model = make_model("mlp", sizes).to(dtype)
    return Task("mlp", "mlp", sizes, model, torch.as_tensor(X, dtype=dtype),
                torch.as_tensor(y), torch.nn.CrossEntropyLoss())


def _resnet_bn() -> Any:
    import torch

    from benchmarks.models import Task
    from torch_backend.examples import make_resnet18

    gen = torch.Generator().manual_seed(0)
    model = make_resnet18(width=6, dtype=torch.float64)
    X = torch.randn(64, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    return Task("resnet_bn", "resnet18", (6,), model, X, y, torch.nn.CrossEntropyLoss())


def _lm(tokens: int = 64, batch: int = 8) -> Any:
    from benchmarks.realistic import Sizes, realistic_task

    sizes = Sizes(gpt2_layers=4, gpt2_embd=128, gpt2_vocab=1024, gpt2_tokens=tokens,
                  gpt2_batch=batch)
    return realistic_task("gpt2", sizes)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------- equal accuracy
def _error(values: Any, ref: np.ndarray) -> float:
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1][: len(ref)]
    return float(np.max(np.abs(v - ref)) / abs(ref[0]))


def _eigenthings_oracle(op: Any, ref: np.ndarray, seed: int) -> dict[str, Any]:
    """Smallest Lanczos step count of hessian-eigenthings that reaches each target."""
    import hessian_eigenthings as he
    import torch
    from hessian_eigenthings.algorithms.lanczos import lanczos_tridiagonal

    calls = [0]

    def matvec(v: Any) -> Any:
        calls[0] += 1
        return op.matvec(v)

    heop = he.LambdaOperator(matvec, op.n, device="cpu", dtype=op.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(op.n, dtype=op.dtype, generator=gen)  # as he.lanczos(seed=seed) draws it
    td = lanczos_tridiagonal(heop, v0, ORACLE_STEPS, reorthogonalize=True)
    alphas = td.alphas.detach().numpy().astype(np.float64)
    betas = td.betas.detach().numpy().astype(np.float64)
    out: dict[str, Any] = {"products_for_60_steps": calls[0]}
    for target in TARGETS:
        for j in range(K, len(alphas) + 1):
            T = np.diag(alphas[:j]) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
            err = _error(np.linalg.eigvalsh(T)[::-1][:K], ref)
            if err <= target:
                out[f"{target:g}"] = {"max_iter": j, "products": j, "error": err}
                break
        else:
            out[f"{target:g}"] = {"max_iter": None, "products": None, "error": None}
    return out


class _CheckCounter:
    """Counts eigsh's products spent growing its missed-eigenvalue check chains, and the checks
    that found something (the wanted values moved): benchmark instrumentation of
    ``dualhess._eigsh._ThickRestart``, undone on exit."""

    def __enter__(self) -> _CheckCounter:
        from dualhess import _eigsh

        self.products = self.checks = self.found = 0
        self._cls = _eigsh._ThickRestart
        self._expand, self._check = self._cls.expand, self._cls.check_for_missed
        counter = self

        def expand(solver: Any) -> bool:
            before = solver.spent
            growing = solver.checking and solver.check_steps < _eigsh._CHECK_STEPS
            out = counter._expand(solver)
            if growing:
                counter.products += solver.spent - before
            return out

        def check(solver: Any, values: Any, scale: float) -> bool:
            finishing = solver.checking and solver.check_steps >= _eigsh._CHECK_STEPS
            out = counter._check(solver, values, scale)
            if finishing:
                counter.checks += 1
                counter.found += int(not out)
            return out

        self._cls.expand, self._cls.check_for_missed = expand, check
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cls.expand, self._cls.check_for_missed = self._expand, self._check


def equal_accuracy(task: Any) -> dict[str, Any]:
    import dualhess
    import torch_backend

    op = torch_backend.hessian(task.model, task.loss_fn, (task.X, task.y),
                               check_deterministic=False)
    ref = np.sort(np.asarray(dualhess.eigsh(op, K, tol=1e-13, criterion="residual", seed=123,
                                            return_vectors=False).values))[::-1]
    runs = []
    for seed in SEEDS:
        row: dict[str, Any] = {"seed": seed}
        for criterion in ("eigenvalue", "residual"):
            for target in TARGETS:
                with _CheckCounter() as checks:
                    r = dualhess.eigsh(op, K, tol=target, seed=seed, criterion=criterion,
                                       return_vectors=False)
                row[f"dualhess {criterion} {target:g}"] = {
                    "products": int(r.num_matvecs), "error": _error(r.values, ref),
                    "converged": bool(np.all(r.converged)), "check_products": checks.products,
                    "checks": checks.checks, "checks_that_found": checks.found}
        from benchmarks import anchors

        if anchors.available("hessian-eigenthings"):
            row["hessian-eigenthings oracle"] = _eigenthings_oracle(op, ref, seed)
        else:  # pip install -e '.[bench]'
            row["hessian-eigenthings oracle"] = {
                f"{t:g}": {"max_iter": None, "products": None, "error": None} for t in TARGETS}
        runs.append(row)
        print(f"  {task.name} seed {seed}: " + ", ".join(
            f"{t:g}: dualhess {row[f'dualhess eigenvalue {t:g}']['products']} / oracle "
            f"{row['hessian-eigenthings oracle'][f'{t:g}']['products']}" for t in TARGETS),
            flush=True)
    return {"n": op.n, "reference": ref.tolist(), "runs": runs}


# ---------------------------------------------------------------------- density speed
def _pyhessian_eig_shim() -> Callable[[], None]:
    """PyHessian 0.1's density calls ``torch.eig`` (removed in torch 1.9): an equivalent for its
    symmetric tridiagonal (real parts in column 0, as the old API returned). Returns the undo."""
    import torch

    def eig(A: Any, eigenvectors: bool = False) -> Any:
        w, V = torch.linalg.eigh(A)
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = eig

    def undo() -> None:
        if had:
            torch.eig = old
        else:
            del torch.eig

    return undo


def density_speed(probes: int = 10, steps: int = 60) -> dict[str, Any]:
    import torch

    import torch_backend
    from benchmarks import anchors
    from dualhess import density

    task = _digits_mlp((64, 300, 250, 10), torch.float32)
    out: dict[str, Any] = {"n": task.n, "probes": probes, "steps": steps, "rows": {}}

    def dualhess_run() -> Any:
        op = torch_backend.hessian(task.model, task.loss_fn, (task.X, task.y),
                                   check_deterministic=False)
        return density(op, num_probes=probes, num_steps=steps, seed=0)

    def pyhessian_run() -> Any:
        undo = _pyhessian_eig_shim()
        try:
            return anchors.pyhessian_density(task, probes, steps)
        finally:
            undo()

    tools = {
        "dualhess": dualhess_run,
        "pyhessian": pyhessian_run,
        "hessian-eigenthings": lambda: anchors.eigenthings_density(task, probes, steps),
        "curvlinops": lambda: anchors.curvlinops_density(task, probes, steps),
    }
    for tool, fn in tools.items():
        clock = _Clock()
        try:
            fn()
            wall, cpu = clock.stop()
            out["rows"][tool] = {"wall_s": wall, "cpu_s": cpu}
        except Exception as exc:  # a peer's failure is a row, not the end of the run
            out["rows"][tool] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  density {tool}: {out['rows'][tool]}", flush=True)
    for tool, fn in tools.items():  # where the time goes: a second, profiled run
        if "error" not in out["rows"][tool]:
            out["rows"][tool].update(_backward_share(fn))
    return out


def _backward_share(fn: Callable[[], Any]) -> dict[str, float]:
    """``fn()`` under cProfile: the seconds in autograd's engine (every backward pass: the
    gradient graph and the products, however a tool calls them) and in all."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    backward = sum(row[3] for key, row in stats.items() if key[2] == "<method 'run_backward' of "
                   "'torch._C._EngineBase' objects>")
    total = sum(row[2] for row in stats.values())  # tottime over every function
    return {"profiled_s": total, "backward_s": backward}


# ---------------------------------------------------------------------- peak memory
def memory_one(tool: str) -> dict[str, Any]:
    """Top-5 to 1e-3 on the ~1M-parameter LM with ``tool``; run in a fresh process."""
    import torch

    torch.set_num_threads(1)
    from benchmarks import anchors

    task = _lm()
    task.model.zero_grad()
    task.loss_fn(task.model(task.X), task.y).backward()  # the baseline holds one gradient
    task.model.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in task.model.parameters())
    with PeakRSS(interval=0.002) as rss:
        clock = _Clock()
        if tool == "dualhess":
            import dualhess
            import torch_backend

            op = torch_backend.hessian(task.model, task.loss_fn, (task.X, task.y),
                                       check_deterministic=False)
            built = rss.peak - rss.start
            r = dualhess.eigsh(op, K, tol=1e-3, seed=0, return_vectors=False)
            products = int(r.num_matvecs)
        elif tool == "pyhessian":
            built = None
            _, products, _ = anchors.pyhessian_top(task, K, 1e-3)
        elif tool == "hessian-eigenthings":
            built = None
            _, products, _ = anchors.eigenthings_top(task, K, 1e-3)
        elif tool == "curvlinops":
            built = None
            _, products, _ = anchors.curvlinops_top(task, K, 1e-3)
        else:
            raise ValueError(f"unknown tool {tool!r}")
        wall, cpu = clock.stop()
    return {"tool": tool, "n": n, "vector_mb": n * 4 / 1e6, "peak_increase_mb":
            (rss.peak - rss.start) / 1e6, "construction_mb": None if built is None else
            built / 1e6, "products": products, "wall_s": wall, "cpu_s": cpu}


def memory(tools: tuple[str, ...]) -> dict[str, Any]:
    rows = {}
    for tool in tools:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.parity", "--memory-tool", tool],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            rows[tool] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        else:
            rows[tool] = json.loads(lines[-1])
        print(f"  memory {tool}: {rows[tool]}", flush=True)
    return rows


# ---------------------------------------------------------------------- the JAX product
def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 40) -> dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds (one call of each per
    round, after two warm-up calls): on a shared machine whose speed drifts over seconds, the
    ratios of interleaved medians are steadier than those of medians taken one after another."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _jax_row(width: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import jax_backend

    sizes = (64, width, width, 10)
    key = jax.random.PRNGKey(0)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (a, b), jnp.float32) / np.sqrt(a),
                       "b": jnp.zeros(b, jnp.float32)})
    X = jax.random.normal(key, (256, 64), jnp.float32)
    y = jnp.arange(256) % 10
    batch = (X, y)

    def loss_fn(p: Any, data: Any) -> Any:
        x, labels = data
        for i, layer in enumerate(p):
            x = x @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                x = jnp.tanh(x)
        logp = jax.nn.log_softmax(x)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    grad = jax.jit(jax.grad(loss_fn))
    hvp = jax.jit(lambda p, v: jax.jvp(lambda q: jax.grad(loss_fn)(q, batch), (p,), (v,))[1])
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    # what dualhess runs for one batch, built by hand: jax.linearize of the gradient, applied
    linear = jax.jit(lambda p: jax.linearize(lambda q: jax.grad(loss_fn)(q, batch), p)[1])(params)
    apply = jax.jit(lambda f, t: f(t))
    op = jax_backend.hessian(loss_fn, params, batch, check_deterministic=False)
    v = op.asarray(np.random.default_rng(0).standard_normal(op.n))
    t = _interleaved({"grad": lambda: grad(params, batch), "plain": lambda: hvp(params, tangent),
                      "linearized": lambda: apply(linear, tangent), "ours": lambda: op.matvec(v)})
    t_grad, t_plain, t_ours = t["grad"], t["plain"], t["ours"]
    return {"n": op.n, "gradient_s": t_grad, "jit_jvp_grad_s": t_plain, "dualhess_s": t_ours,
            "jax_linearize_s": t["linearized"],
            "dualhess_over_plain": t_ours / t_plain, "dualhess_over_gradient": t_ours / t_grad}


def jax_product(widths: tuple[int, ...] = (256, 900), processes: int = 3) -> dict[str, Any]:
    """Each width in ``processes`` fresh processes (the committed row is the median process):
    identical processes measured the kept linearisation's product at 16-88 ms at n = 878k."""
    rows = {}
    for width in widths:
        runs = []
        for _ in range(processes):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.parity", "--jax-row",
                                   str(width)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"jax row {width}: " + proc.stderr[-2000:])
            runs.append(json.loads(lines[-1]))
        runs.sort(key=lambda r: r["dualhess_over_plain"])
        row = dict(runs[len(runs) // 2])
        row["processes"] = [{k: r[k] for k in ("gradient_s", "jit_jvp_grad_s", "dualhess_s",
                                               "jax_linearize_s")} for r in runs]
        rows[str(row["n"])] = row
        print(f"  jax n={row['n']}: {row}", flush=True)
    return rows


# ---------------------------------------------------------------------- report
def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, part in results.get("equal_accuracy", {}).items():
        for t in TARGETS:
            ours = [r[f"dualhess eigenvalue {t:g}"] for r in part["runs"]]
            oracle = [r["hessian-eigenthings oracle"][f"{t:g}"]["products"] for r in part["runs"]]
            mine = [r["products"] for r in ours]
            worst = max(r["error"] for r in ours)
            if any(x is None for x in oracle):
                met = None  # hessian-eigenthings not installed, or not within 60 steps
            else:
                met = sum(mine) <= sum(oracle)
            rows.append({
                "target": f"{name}: top-5 products at {t:g} <= hessian-eigenthings' oracle",
                "measured": f"dualhess {np.median(mine):.0f} (seeds {mine}, worst error "
                            f"{worst:.1e}) vs oracle "
                            + (f"{np.median(oracle):.0f} (seeds {oracle})" if met is not None
                               else f"{oracle}"),
                "met": met})
    dens = results.get("density", {}).get("rows", {})
    if "dualhess" in dens and "wall_s" in dens["dualhess"]:
        peers = {k: v["cpu_s"] for k, v in dens.items() if k != "dualhess" and "cpu_s" in v}
        best = min(peers.values()) if peers else None
        rows.append({
            "target": "density 10 x 60 at PyHessian's and hessian-eigenthings' speed or better",
            "measured": f"dualhess {dens['dualhess']['cpu_s']:.2f} s CPU; " + ", ".join(
                f"{k} {v:.2f} s" for k, v in peers.items()),
            "met": None if best is None else dens["dualhess"]["cpu_s"] <= min(
                peers.get("pyhessian", np.inf), peers.get("hessian-eigenthings", np.inf))})
    mem = results.get("memory", {})
    if "peak_increase_mb" in mem.get("dualhess", {}) and "peak_increase_mb" in mem.get(
            "pyhessian", {}):
        ratio = mem["dualhess"]["peak_increase_mb"] / max(mem["pyhessian"]["peak_increase_mb"],
                                                          1e-9)
        rows.append({"target": "top-5 peak-RSS increase on the ~1M LM <= 1.5x PyHessian's",
                     "measured": f"{ratio:.2f}x ({mem['dualhess']['peak_increase_mb']:.0f} MB "
                                 f"vs {mem['pyhessian']['peak_increase_mb']:.0f} MB)",
                     "met": ratio <= 1.5})
    for row in results.get("jax", {}).values():
        rows.append({"target": f"JAX product, n = {row['n']:,}: <= 1.05x jit(jvp(grad)) and "
                               "<= 2.2x a gradient",
                     "measured": f"{row['dualhess_over_plain']:.2f}x and "
                                 f"{row['dualhess_over_gradient']:.2f}x",
                     "met": row["dualhess_over_plain"] <= 1.05
                     and row["dualhess_over_gradient"] <= 2.2})
    return rows


def _notes(results: dict[str, Any]) -> list[str]:
    """Explanations computed from the measurements (so ``--from-json`` reproduces them)."""
    notes = []
    for name, part in results.get("equal_accuracy", {}).items():
        for t in TARGETS:
            ours = [r[f"dualhess eigenvalue {t:g}"] for r in part["runs"]]
            oracle = [r["hessian-eigenthings oracle"][f"{t:g}"]["products"] for r in part["runs"]]
            if any(x is None for x in oracle) or "check_products" not in ours[0]:
                continue
            mine = np.median([r["products"] for r in ours])
            check = np.median([r["check_products"] for r in ours])
            errors = np.median([r["error"] for r in ours])
            found = sum(r["checks_that_found"] for r in ours)
            notes.append(
                f"{name} at {t:g}: dualhess's median {mine:.0f} products include {check:.0f} for "
                f"the missed-eigenvalue check ({found} of {len(ours)} runs found a wanted "
                f"eigenvalue the first convergence had missed, and paid a second check); "
                f"without them {mine - check:.0f} against the oracle's {np.median(oracle):.0f}. "
                f"The rest is the proof: the eigenvalues delivered were within {errors:.0e} "
                f"(median) where {t:g} was asked, because the k-th pair's bound falls back to "
                "its residual while its neighbour Ritz value has not converged (no gap is known "
                "there). The oracle reads the answer off the reference; eigenthings itself "
                "returns after max_iter steps with no accuracy known.")
    dens = results.get("density", {}).get("rows", {})
    if "backward_s" in dens.get("dualhess", {}):
        parts = ", ".join(
            f"{tool} {row['backward_s']:.1f} s in backward passes + "
            f"{row['profiled_s'] - row['backward_s']:.1f} s else"
            for tool, row in dens.items() if "backward_s" in row)
        notes.append(f"Density (profiled run): {parts}. The products cost the same in every "
                     "tool; the remainder is the Krylov bookkeeping: dualhess reorthogonalises "
                     "each vector once against its probe's basis (classical Gram-Schmidt, in "
                     "float64 across 8,192-entry chunks), and a second time only after "
                     "cancellation (DGKS), where PyHessian makes one modified Gram-Schmidt "
                     "pass.")
    for row in results.get("jax", {}).values():
        each = [r["dualhess_s"] * 1e3 for r in row.get("processes", [])]
        plain = [r["jit_jvp_grad_s"] * 1e3 for r in row.get("processes", [])]
        lin = [r.get("jax_linearize_s", 0.0) * 1e3 for r in row.get("processes", [])]
        if each and row["dualhess_over_plain"] > 1.05 and min(lin) > 0:
            notes.append(
                f"JAX at n = {row['n']:,}: with one batch dualhess keeps jax.linearize of the "
                "gradient and applies its tangent program per product (fewer flops than "
                "jvp(grad): 2.6e9 against 3.5e9). In the same processes a hand-built "
                "jax.linearize of the gradient, applied to a tangent of ones, took "
                f"{', '.join(f'{x:.0f}' for x in lin)} ms and jit(jvp(grad)) "
                f"{', '.join(f'{x:.0f}' for x in plain)} ms, while dualhess's product (a random "
                f"tangent) took {', '.join(f'{x:.0f}' for x in each)} ms. Applied to a random "
                "tangent, the hand-built program was as slow as dualhess's (80-87 ms) in some "
                "processes and 20 ms in others (measured while preparing this run). The slow "
                "path belongs to XLA's CPU code for this program and depends on the data or the "
                "buffers; its cause is not found.")
        elif each and max(each) > 2 * min(each):
            notes.append(
                f"JAX at n = {row['n']:,}: dualhess's product took {', '.join(f'{x:.0f}' for x in each)}"
                f" ms in identical fresh processes while jit(jvp(grad)) took "
                f"{', '.join(f'{x:.0f}' for x in plain)} ms: the kept linearisation's compiled "
                "tangent program (fewer flops than jvp(grad): 2.6e9 against 3.5e9) runs at "
                "full speed in some processes and 4-5x slower in others; the cause is not "
                "found (XLA CPU runtime).")
    return notes


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# dualhess against its peers: equal accuracy, density, memory, the JAX product",
        "",
        f"{meta['machine']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end; {meta['seconds']:.0f} s in all. "
        "Generated by `python -m benchmarks.parity`.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for row in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {row['measured']} | {met} |")
    for name, part in results.get("equal_accuracy", {}).items():
        lines += ["", f"## Products at equal accuracy: {name} (n = {part['n']:,}, top-5, "
                      "float64)", "",
                  "| seed | target | dualhess (eigenvalue) products / error | of which the "
                  "missed-eigenvalue check (checks, of which found one) | dualhess (residual) "
                  "products / error | hessian-eigenthings oracle max_iter / error |",
                  "|---|---|---|---|---|---|"]
        for run in part["runs"]:
            for t in TARGETS:
                a = run[f"dualhess eigenvalue {t:g}"]
                b = run[f"dualhess residual {t:g}"]
                o = run["hessian-eigenthings oracle"][f"{t:g}"]
                oracle = "not within 60" if o["products"] is None else \
                    f"{o['products']} / {o['error']:.1e}"
                check = (f"{a['check_products']} ({a['checks']}, {a['checks_that_found']})"
                         if "check_products" in a else "—")
                lines.append(f"| {run['seed']} | {t:g} | {a['products']} / {a['error']:.1e} | "
                             f"{check} | {b['products']} / {b['error']:.1e} | {oracle} |")
    dens = results.get("density")
    if dens:
        lines += ["", f"## Density: {dens['probes']} probes x {dens['steps']} steps, digits MLP "
                      f"(n = {dens['n']:,}, float32)", "",
                  "| tool | wall (s) | CPU (s) | profiled run: in autograd's backward engine / "
                  "everything else (s) | note |", "|---|---|---|---|---|"]
        for tool, row in dens["rows"].items():
            if "error" in row:
                lines.append(f"| {tool} | — | — | — | failed: {row['error']} |")
            else:
                note = "torch.eig shim (torch.linalg.eigh)" if tool == "pyhessian" else ""
                split = (f"{row['backward_s']:.2f} / {row['profiled_s'] - row['backward_s']:.2f}"
                         if "backward_s" in row else "—")
                lines.append(f"| {tool} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {split} | "
                             f"{note} |")
    mem = results.get("memory")
    if mem:
        lines += ["", "## Peak memory: top-5 to 1e-3, ~1M-parameter GPT-2 LM (float32), one "
                      "process per tool", "",
                  "| tool | n | peak RSS increase (MB) | in vectors of n | construction (MB) | "
                  "products | wall (s) |", "|---|---|---|---|---|---|---|"]
        for tool, row in mem.items():
            if "error" in row:
                lines.append(f"| {tool} | — | — | — | — | — | failed: {row['error']} |")
                continue
            built = "—" if row["construction_mb"] is None else f"{row['construction_mb']:.0f}"
            lines.append(f"| {tool} | {row['n']:,} | {row['peak_increase_mb']:.0f} | "
                         f"{row['peak_increase_mb'] / row['vector_mb']:.0f} | {built} | "
                         f"{row['products']} | {row['wall_s']:.1f} |")
    jx = results.get("jax")
    if jx:
        lines += ["", "## The JAX product (float32 MLP, batch 256, median s; the median of "
                      "fresh processes)", "",
                  "| n | jitted gradient | jit(jvp(grad)) | jax.linearize of the gradient, "
                  "applied | dualhess matvec | x plain | x gradient | dualhess matvec in each "
                  "process |", "|---|---|---|---|---|---|---|---|"]
        for row in jx.values():
            each = ", ".join(f"{r['dualhess_s'] * 1e3:.1f}" for r in row.get("processes", []))
            lin = row.get("jax_linearize_s")
            lin = "—" if lin is None else f"{lin * 1e3:.2f} ms"
            lines.append(f"| {row['n']:,} | {row['gradient_s'] * 1e3:.2f} ms | "
                         f"{row['jit_jvp_grad_s'] * 1e3:.2f} ms | {lin} | "
                         f"{row['dualhess_s'] * 1e3:.2f} ms"
                         f" | {row['dualhess_over_plain']:.2f} | "
                         f"{row['dualhess_over_gradient']:.2f} | {each or '—'} ms |")
    notes = _notes(results)
    if notes:
        lines += ["", "## What the measurements say about the misses", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="accuracy,density,memory,jax",
                        help="comma-separated parts to run (default: all four)")
    parser.add_argument("--memory-tool", help=argparse.SUPPRESS)
    parser.add_argument("--jax-row", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path,
                        help="rewrite the markdown from a results JSON (no measurement)")
    args = parser.parse_args(argv)
    if args.memory_tool:
        print(json.dumps(memory_one(args.memory_tool)), flush=True)
        return 0
    if args.jax_row:
        print(json.dumps(_jax_row(args.jax_row)), flush=True)
        return 0
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["targets"] = _targets(results)
        (args.out / "parity.md").write_text(markdown(results))
        return 0
    import torch

    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    start, load_start = time.perf_counter(), _load()
    results: dict[str, Any] = {}
    if "accuracy" in parts:
        import torch as _t

        results["equal_accuracy"] = {
            "digits MLP": equal_accuracy(_digits_mlp((64, 150, 10), _t.float64)),
            "ResNet-18 with BatchNorm": equal_accuracy(_resnet_bn()),
        }
    if "density" in parts:
        results["density"] = density_speed()
    if "memory" in parts:
        results["memory"] = memory(("dualhess", "pyhessian", "hessian-eigenthings",
                                    "curvlinops"))
    if "jax" in parts:
        results["jax"] = jax_product()
    results["meta"] = {
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"torch {torch.__version__} (1 thread)",
        "load_start": load_start, "load_end": _load(), "seconds": time.perf_counter() - start}
    results["targets"] = _targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(results, indent=1))
    (args.out / "parity.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
