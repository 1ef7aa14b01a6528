"""The realistic part of the CPU suite: end to end, construction included, at the sizes people use.

Run it with ``python -m benchmarks.run --suite realistic`` (see ``benchmarks/README.md``). Three
float32 models with random weights: the ResNet-18-layout network of
:func:`torch_backend.examples.make_resnet18` (width 8, 176,402 parameters, eval-mode BatchNorm,
a CIFAR-shaped batch of 32), a tiny GPT-2 and a tiny ViT (Hugging Face configs, eager attention,
no dropout). Every tool computes the top-3 eigenvalues *end to end*: its own construction plus
its eigensolver, timed together. dualhess rows also split that into construction, per-product
time, the product/gradient ratio and the bookkeeping share (eigsh time outside the products,
over the product time). There is no exact reference at these sizes: each tool's values are
compared with dualhess torch's, whose residuals certify ``||Hv - lambda v|| <= 1e-4 lambda_max``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from . import anchors
from .models import Task

__all__ = ["REALISTIC_MODELS", "realistic_task", "run_realistic", "markdown"]

REALISTIC_MODELS = ("resnet18", "gpt2", "vit")
K, TOL, PYHESSIAN_TOL = 3, 1e-4, 1e-3


@dataclasses.dataclass
class Sizes:
    """Sizes of one run (the committed one, or the smoke test's tiny one)."""

    resnet_width: int = 8
    batch: int = 32
    gpt2_layers: int = 2
    gpt2_embd: int = 64
    gpt2_vocab: int = 128
    gpt2_tokens: int = 32
    gpt2_batch: int = 8
    vit_hidden: int = 64
    vit_layers: int = 2


TINY = Sizes(resnet_width=2, batch=4, gpt2_layers=1, gpt2_embd=16, gpt2_vocab=32,
             gpt2_tokens=8, gpt2_batch=2, vit_hidden=16, vit_layers=1)


def _logits_of(model: Any, key: str) -> Any:
    import torch

    class LogitsOf(torch.nn.Module):
        """``inputs -> logits`` (flattened over positions for a language model)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.model(**{key: x}).logits
            return logits.reshape(-1, logits.shape[-1])

    return LogitsOf().eval()


def _TokenCrossEntropy() -> Any:  # noqa: N802 - a class factory (torch imported lazily)
    import torch

    class TokenCrossEntropy(torch.nn.CrossEntropyLoss):
        """Mean cross-entropy over every token: ``(B T, V)`` logits, ``(B, T)`` targets (the
        targets keep the batch's leading dimension, as every backend's data checks want)."""

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return super().forward(logits, target.reshape(-1))

    return TokenCrossEntropy()


def realistic_task(name: str, sizes: Sizes | None = None) -> Task:
    """One realistic problem: a float32 model in eval mode, one batch and cross-entropy."""
    import torch

    sizes = Sizes() if sizes is None else sizes

    gen = torch.Generator().manual_seed(0)
    loss = torch.nn.CrossEntropyLoss()
    if name == "resnet18":
        from torch_backend.examples import make_resnet18

        model = make_resnet18(width=sizes.resnet_width, dtype=torch.float32)
        X = torch.randn(sizes.batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (sizes.batch,), generator=gen)
        return Task(name, "resnet18", (), model, X, y, loss)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=sizes.gpt2_layers, n_head=2, n_embd=sizes.gpt2_embd,
            vocab_size=sizes.gpt2_vocab, n_positions=sizes.gpt2_tokens, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        )
        torch.manual_seed(0)
        model = _logits_of(GPT2LMHeadModel(config).eval(), "input_ids")
        ids = torch.randint(0, sizes.gpt2_vocab, (sizes.gpt2_batch, sizes.gpt2_tokens + 1),
                            generator=gen)
        return Task(name, "gpt2", (), model, ids[:, :-1], ids[:, 1:], _TokenCrossEntropy())
    if name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=sizes.vit_hidden,
            num_hidden_layers=sizes.vit_layers, num_attention_heads=2,
            intermediate_size=2 * sizes.vit_hidden, num_labels=10, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager",
        )
        torch.manual_seed(0)
        model = _logits_of(ViTForImageClassification(config).eval(), "pixel_values")
        X = torch.randn(sizes.batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (sizes.batch,), generator=gen)
        return Task(name, "vit", (), model, X, y, loss)
    raise ValueError(f"unknown realistic model {name!r}; choose from {REALISTIC_MODELS}")


class _Clock:
    """Wall time and process CPU time (all threads) since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _median(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of ``fn`` over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        clock = _Clock()
        fn()
        wall, cpu = clock.stop()
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), statistics.median(cpus)


def gradient_time(task: Task, repeats: int) -> tuple[float, float]:
    """One plain gradient of the batch loss (``torch.autograd.grad``): median wall and CPU."""
    import torch

    params = [p for p in task.model.parameters() if p.requires_grad]

    def grad() -> Any:
        return torch.autograd.grad(task.loss_fn(task.model(task.X), task.y), params)

    grad()
    return _median(grad, repeats)


class _TimedOperator:
    """Factory of a :class:`dualhess.Operator` that times the products of another one."""

    @staticmethod
    def wrap(op: Any) -> Any:
        import dualhess

        class Timed(dualhess.Operator):
            def __init__(self) -> None:
                super().__init__(op.shape, op.dtype, like=op._like, check_finite=False)
                self.seconds = 0.0
                self.cpu_seconds = 0.0

            @property
            def fixed_shapes(self) -> bool:
                return op.fixed_shapes

            def _timed(self, fn: Callable[[Any], Any], x: Any) -> Any:
                clock = _Clock()
                out = fn(x)
                _block(out)
                wall, cpu = clock.stop()
                self.seconds += wall
                self.cpu_seconds += cpu
                return out

            def _matvec(self, v: Any) -> Any:
                return self._timed(op.matvec, v)

            def _matmat(self, V: Any) -> Any:
                return self._timed(op.matmat, V)

        return Timed()


def _block(x: Any) -> None:
    ready = getattr(x, "block_until_ready", None)
    if ready is not None:
        ready()


def dualhess_row(tool: str, build: Callable[[], Any], grad: tuple[float, float],
                 repeats: int) -> dict[str, Any]:
    """Construction, per-product time, eigsh(k=3, tol=1e-4) and the bookkeeping share.

    Every time is recorded as wall and as process CPU time (``*_cpu_s``); the ratios
    (construction in products, product / gradient, bookkeeping share) are CPU-time ratios,
    which a machine shared with other jobs leaves far steadier than wall-time ones.
    """
    import dualhess

    clock = _Clock()
    op = build()
    construction, construction_cpu = clock.stop()
    v = op.asarray(np.random.default_rng(7).standard_normal(op.n))
    clock = _Clock()
    _block(op.matvec(v))
    first, first_cpu = clock.stop()
    product, product_cpu = _median(lambda: _block(op.matvec(v)), repeats)
    timed = _TimedOperator.wrap(op)
    clock = _Clock()
    res = dualhess.eigsh(timed, k=K, tol=TOL, seed=0, return_vectors=False)
    eig_seconds, eig_cpu = clock.stop()
    return {
        "tool": tool, "status": "ok", "values": [float(x) for x in res.values],
        "residual_rel": float(np.max(res.residuals) / abs(res.values[0])),
        "converged": bool(np.all(res.converged)), "hvps": int(res.num_matvecs),
        "construction_s": construction, "first_product_s": first, "product_s": product,
        "construction_cpu_s": construction_cpu, "first_product_cpu_s": first_cpu,
        "product_cpu_s": product_cpu, "eigsh_s": eig_seconds, "eigsh_cpu_s": eig_cpu,
        "end_to_end_s": construction + eig_seconds,
        "end_to_end_cpu_s": construction_cpu + eig_cpu,
        "construction_products": construction_cpu / product_cpu,
        "product_over_gradient": product_cpu / grad[1],
        "bookkeeping_share": (eig_cpu - timed.cpu_seconds) / timed.cpu_seconds,
        "bookkeeping_share_wall": (eig_seconds - timed.seconds) / timed.seconds,
        "method": getattr(op, "method", None), "matmat_method": getattr(op, "matmat_method", None),
    }


def anchor_row(tool: str, fn: Callable[[], tuple[np.ndarray, int, int]]) -> dict[str, Any]:
    """An anchor's top-3, end to end (its construction is inside ``fn``)."""
    clock = _Clock()
    values, hvps, calls = fn()
    seconds, cpu = clock.stop()
    return {"tool": tool, "status": "ok", "values": [float(x) for x in values], "hvps": hvps,
            "calls": calls, "end_to_end_s": seconds, "end_to_end_cpu_s": cpu}


def _failed(tool: str, exc: BaseException) -> dict[str, Any]:
    line = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"tool": tool, "status": "failed", "error": f"{type(exc).__name__}: {line}"}


def _twin_builder(task: Task) -> Callable[[], Any]:
    def build() -> Any:
        from dualhess import backends

        jax_backend = backends.get_backend("jax")
        op, _ = jax_backend.twin_hessian(task.model, task.loss_fn, task.data, dtype="float32")
        return op

    return build


def bench_realistic_model(name: str, sizes: Sizes, repeats: int,
                          tools: tuple[str, ...]) -> dict[str, Any]:
    import torch

    import torch_backend

    task = realistic_task(name, sizes)
    grad = gradient_time(task, repeats)
    out: dict[str, Any] = {"model": name, "n": task.n, "gradient_s": grad[0],
                           "gradient_cpu_s": grad[1], "rows": []}
    rows = out["rows"]

    def attempt(tool: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"  {name}: {tool} ...", flush=True)
        try:
            rows.append(fn())
        except Exception as exc:  # an anchor that raises is a failed row, never dropped
            traceback.print_exc(limit=2)
            rows.append(_failed(tool, exc))

    attempt("dualhess torch", lambda: dualhess_row(
        "dualhess torch", lambda: torch_backend.hessian(task.model, task.loss_fn, task.data),
        grad, repeats))
    if "jax" in tools:
        attempt("dualhess JAX twin", lambda: dualhess_row(
            "dualhess JAX twin", _twin_builder(task), grad, repeats))
    old = torch.get_default_dtype()
    if "pyhessian" in tools and anchors.available("pyhessian"):
        attempt("PyHessian", lambda: anchor_row(
            "PyHessian", lambda: anchors.pyhessian_top(task, K, PYHESSIAN_TOL)))
    torch.set_default_dtype(old)
    if "hessian-eigenthings" in tools and anchors.available("hessian-eigenthings"):
        attempt("hessian-eigenthings", lambda: anchor_row(
            "hessian-eigenthings", lambda: anchors.eigenthings_top(task, K, TOL)))
    if "curvlinops" in tools and anchors.available("curvlinops"):
        attempt("curvlinops + scipy eigsh", lambda: anchor_row(
            "curvlinops + scipy eigsh", lambda: anchors.curvlinops_top(task, K, TOL)))
    ref = rows[0] if rows and rows[0].get("status") == "ok" else None
    for row in rows:
        if row.get("status") != "ok":
            continue
        if ref is not None:
            a, b = np.asarray(row["values"]), np.asarray(ref["values"])
            row["error_vs_dualhess"] = float(np.max(np.abs(a - b)) / abs(b[0]))
            row["speedup_of_dualhess"] = row["end_to_end_s"] / ref["end_to_end_s"]
            row["speedup_of_dualhess_cpu"] = row["end_to_end_cpu_s"] / ref["end_to_end_cpu_s"]
    return out


def run_realistic(sizes: Sizes | None = None, *, models: tuple[str, ...] = REALISTIC_MODELS,
                  repeats: int = 3,
                  tools: tuple[str, ...] = ("jax", "pyhessian", "hessian-eigenthings",
                                            "curvlinops")) -> dict[str, Any]:
    """Every model of the realistic part; a dict ready for JSON (see :func:`markdown`)."""
    import torch

    from .run import _environment

    sizes = Sizes() if sizes is None else sizes

    start = time.perf_counter()
    results: dict[str, Any] = {"suite": "realistic", "environment": _environment(torch),
                               "k": K, "tol": TOL, "pyhessian_tol": PYHESSIAN_TOL,
                               "models": []}
    for name in models:
        results["models"].append(bench_realistic_model(name, sizes, repeats, tools))
    results["seconds"] = time.perf_counter() - start
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["targets"] = targets(results)
    return results


def _row(results: dict[str, Any], model: str, tool: str) -> dict[str, Any] | None:
    for entry in results["models"]:
        if entry["model"] == model:
            for row in entry["rows"]:
                if row["tool"] == tool and row.get("status") == "ok":
                    return row
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's targets on the ResNet-18-layout network (and the bookkeeping on all)."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        out.append({"target": target, "measured": measured, "met": met})

    torch_row = _row(results, "resnet18", "dualhess torch")
    jax_row = _row(results, "resnet18", "dualhess JAX twin")
    ph = _row(results, "resnet18", "PyHessian")
    if torch_row and ph:
        ratio = ph["end_to_end_cpu_s"] / torch_row["end_to_end_cpu_s"]
        wall = ph["end_to_end_s"] / torch_row["end_to_end_s"]
        add("ResNet end to end >= 2x faster than PyHessian's top-3",
            f"{ratio:.2f}x in CPU time ({torch_row['end_to_end_cpu_s']:.1f} s vs "
            f"{ph['end_to_end_cpu_s']:.1f} s); {wall:.2f}x in wall time "
            f"({torch_row['end_to_end_s']:.1f} s vs {ph['end_to_end_s']:.1f} s)", ratio >= 2)
    if torch_row:
        c = torch_row["construction_products"]
        add("ResNet construction <= 5 products' worth",
            f"{c:.1f} products (CPU {torch_row['construction_cpu_s']:.2f} s; first product "
            f"{torch_row['first_product_cpu_s']:.2f} s, later {torch_row['product_cpu_s']:.3f} s)",
            c <= 5)
        r = torch_row["product_over_gradient"]
        add("double-backward product <= 2.2x a gradient (ResNet)", f"{r:.2f}x", r <= 2.2)
    for entry in results["models"]:
        for tool in ("dualhess torch", "dualhess JAX twin"):
            row = _row(results, entry["model"], tool)
            if row:
                s = row["bookkeeping_share"]
                add(f"bookkeeping <= 15% of product time ({tool}, {entry['model']}, "
                    f"n = {entry['n']:,})", f"{100 * s:.1f}%", s <= 0.15)
    if torch_row:
        if jax_row:
            r = jax_row["product_cpu_s"] / torch_row["product_cpu_s"]
            add("JAX-twin product <= 1.2x torch's (ResNet)",
                f"{r:.2f}x in CPU time ({jax_row['product_cpu_s']:.3f} s vs "
                f"{torch_row['product_cpu_s']:.3f} s)", r <= 1.2)
        else:
            failed = [row for entry in results["models"] if entry["model"] == "resnet18"
                      for row in entry["rows"] if row["tool"] == "dualhess JAX twin"]
            why = failed[0].get("error", "not run") if failed else "not run"
            add("JAX-twin product <= 1.2x torch's (ResNet)", f"not measured: {why}", None)
    add("realistic suite < 600 s on 2 cores", f"{results['seconds']:.0f} s",
        results["seconds"] < 600)
    return out


def _f(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown page (targets first, then one table per model)."""
    env = results["environment"]
    lines = [
        "# dualhess benchmarks: realistic part of the CPU suite",
        "",
        f"{env.get('cpus')} CPUs, torch {env.get('torch')} ({env.get('torch_threads')} threads), "
        f"jax {env.get('jax')}; load average {env.get('load_average')} at the start, "
        f"{env.get('load_average_end')} at the end (the machine was shared); "
        f"{results['seconds']:.0f} s in all. Top-{results['k']} eigenvalues, dualhess to "
        f"residual {results['tol']:g} x lambda_max, PyHessian tol {results['pyhessian_tol']:g}, "
        "hessian-eigenthings and scipy tol 1e-4. Every time is end to end (construction + "
        "solver), one run. Ratios are of process CPU time (all threads; the wall-time "
        "columns and ratios are in the JSON too): on a machine shared with other jobs, wall "
        "times of the same work varied 5-10x within this run, CPU times far less.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    for entry in results["models"]:
        lines += [
            "",
            f"## {entry['model']} (n = {entry['n']:,}; one gradient {entry['gradient_s']:.3f} s, "
            f"CPU {entry['gradient_cpu_s']:.3f} s)",
            "",
            "| tool | end to end, wall (s) | CPU (s) | x dualhess (CPU) | HVPs | max error vs "
            "dualhess (of λ1) | construction, CPU (s) | products' worth | product, CPU (s) | "
            "product / gradient | bookkeeping / products | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in entry["rows"]:
            if row.get("status") != "ok":
                lines.append(f"| {row['tool']} | failed | | | | | | | | | | {row['error']} |")
                continue
            note = ""
            if "residual_rel" in row:
                note = (f"max residual {row['residual_rel']:.1e} λ1, converged "
                        f"{row['converged']}; first product CPU {row['first_product_cpu_s']:.3f}"
                        f" s; bookkeeping in wall time {100 * row['bookkeeping_share_wall']:.1f}%")
                if row.get("method"):
                    note += f"; engine {row['method']}, matmat {row['matmat_method']}"
            pct = row.get("bookkeeping_share")
            lines.append(
                f"| {row['tool']} | {row['end_to_end_s']:.2f} | {row['end_to_end_cpu_s']:.2f} | "
                f"{_f(row.get('speedup_of_dualhess_cpu'), '.2f')} | {row['hvps']} | "
                f"{_f(row.get('error_vs_dualhess'), '.1e')} | "
                f"{_f(row.get('construction_cpu_s'), '.2f')} | "
                f"{_f(row.get('construction_products'), '.1f')} | "
                f"{_f(row.get('product_cpu_s'), '.3f')} | "
                f"{_f(row.get('product_over_gradient'), '.2f')} | "
                f"{'—' if pct is None else f'{100 * pct:.1f}%'} | {note} |"
            )
    return "\n".join(lines) + "\n"
