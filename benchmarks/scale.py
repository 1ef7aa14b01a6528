"""GPT-2 small on this CPU: gradient, one product, top-1 -- wall time, products, peak memory.

``python -m benchmarks.scale`` builds a Hugging Face GPT-2 small (124M parameters, random
init, float32, 50,257-token vocabulary) on 2 sequences of 64 tokens with its causal-LM loss
(``torch_backend._hf.CausalLMLoss``: the mean over every kept token), and measures, each stage
in a fresh process so that its memory is its own:

* ``gradient``: the gradient of the loss (``torch.autograd.grad``): one warm-up call, the
  median of three timed ones, and one more under the torch profiler (its matrix products);
* ``product``: the Hessian operator (``torch_backend.hessian``, ``method="autograd"``) and
  its Hessian-vector products in the same way (the first, the median of three, one profiled);
* ``top1_device`` / ``top1_disk``: ``eigsh(k=1, tol=1e-3, criterion="eigenvalue")`` with the
  Krylov basis on the device (here: host memory) and in a file on disk;
* ``jax_twin``: the JAX twin (``torch.export`` of model and loss, interpreted in JAX), its
  conversion time and memory, and one product through it (compile, then timed).

Peak memory is the largest resident set size (sampled every 5 ms from ``/proc/self/statm``)
above the resident size when the stage began, after the model and data were built.

Targets (issue 25): a product <= 2.2x a gradient; a product's peak memory <= 2.5x the
gradient's; top-1 within 10 minutes on 2 cores; ``basis="disk"`` keeps peak memory within
one vector's size of the device basis' minus the basis itself.

``--tiny`` runs a 2-layer, 64-wide GPT-2 in seconds (the smoke test). ``--device cuda`` runs
the torch stages on a GPU (the GPU script's GPT-2 rows, ``python -m benchmarks.gpu --models
gpt2_small``): peak memory is then ``torch.cuda.max_memory_allocated`` above the memory
allocated when the stage began, and ``top1_device`` keeps the basis in GPU memory.
Writes ``benchmarks/results/scale.json`` and ``scale.md`` (``scale_cuda.*`` on a GPU;
``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("gradient", "product", "top1_device", "top1_disk", "jax_twin")
SEQ_LEN, BATCH = 64, 2


class PeakRSS:
    """The peak resident set size above the level at entry, sampled on a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def now_mb(self) -> float:
        """The resident set now, above the level at entry."""
        return (self.rss() - self.start) / 2**20


class PeakCUDA:
    """The peak CUDA memory allocated above the level at entry (``torch.cuda`` statistics)."""

    def __enter__(self) -> PeakCUDA:
        import torch

        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def now_mb(self) -> float:
        import torch

        return (torch.cuda.memory_allocated() - self.start) / 2**20


def _seconds(fn: Any, device: str) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _matmul_profile(fn: Any, device: str) -> dict[str, Any]:
    """One more call of ``fn`` under the torch profiler: the seconds and calls of its matrix
    products (``mm``, ``addmm``, ``bmm``) and the seconds of every operator (CPU only)."""
    if device != "cpu":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    matmul = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    return {"matmul_s": sum(e.self_cpu_time_total for e in matmul) / 1e6,
            "matmul_calls": int(sum(e.count for e in matmul)),
            "profiled_s": sum(e.self_cpu_time_total for e in events) / 1e6}


def peak_memory(device: str) -> Any:
    """The peak-memory meter of ``device``: resident set size on the CPU, CUDA statistics."""
    return PeakRSS() if device == "cpu" else PeakCUDA()


def build(tiny: bool, device: str = "cpu") -> tuple[Any, Any, list]:
    """GPT-2 (small, or tiny), its causal-LM loss and 2 x 64 tokens, float32, eval mode."""
    import torch
    import transformers

    from torch_backend._hf import CausalLMLoss

    torch.manual_seed(0)
    if tiny:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000,
                                         n_positions=SEQ_LEN)
    else:
        config = transformers.GPT2Config()  # GPT-2 small: 124M parameters, 50,257 tokens
    config.use_cache = False
    model = transformers.GPT2LMHeadModel(config).float().eval().to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), generator=gen).to(device)
    loss = CausalLMLoss(num_tokens=BATCH * (SEQ_LEN - 1))
    return model, loss, [(ids, ids.clone())]


def stage(name: str, tiny: bool, device: str = "cpu") -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    if device != "cpu" and name == "jax_twin":
        raise ValueError("the jax_twin stage runs on the CPU only (--device cpu)")
    model, loss, data = build(tiny, device)
    n = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"stage": name, "n": n, "vector_mb": 4 * n / 2**20,
                           "setup_s": time.perf_counter() - t0}
    if name == "gradient":
        params = list(model.parameters())
        (inputs, labels), = data

        def gradient() -> None:
            torch.autograd.grad(loss(model(inputs), labels), params)

        with peak_memory(device) as mem:
            out["first_s"] = _seconds(gradient, device)
            out["wall_s"] = float(np.median([_seconds(gradient, device) for _ in range(3)]))
        out["peak_mb"] = mem.increase_mb
        out.update(_matmul_profile(gradient, device))
    elif name == "product":
        import torch_backend as tb

        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            op = tb.hessian(model, loss, data, method="autograd", check_deterministic=False,
                            check_symmetric=False)
            out["build_s"] = time.perf_counter() - t0
            out["graph_mb"] = mem.now_mb  # the kept first-order graph (and its gradient)
            v = op.asarray(np.random.default_rng(0).standard_normal(op.n))
            out["first_product_s"] = _seconds(lambda: op.matvec(v), device)
            out["wall_s"] = float(np.median([_seconds(lambda: op.matvec(v), device)
                                             for _ in range(3)]))
        out["peak_mb"] = mem.increase_mb
        out.update(_matmul_profile(lambda: op.matvec(v), device))
    elif name.startswith("top1"):
        import dualhess
        import torch_backend as tb

        basis = name.split("_")[1]
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            op = tb.hessian(model, loss, data, method="autograd", check_deterministic=False,
                            check_symmetric=False)
            result = dualhess.eigsh(op, k=1, tol=1e-3, criterion="eigenvalue", seed=0,
                                    basis=basis, return_vectors=False)
            out["wall_s"] = time.perf_counter() - t0
        out.update(peak_mb=mem.increase_mb, products=int(result.num_matvecs),
                   value=float(result.values[0]), converged=bool(result.converged[0]),
                   residual=float(result.residuals[0]))
    elif name == "jax_twin":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from dualhess.backends import get_backend

        jax_backend = get_backend("jax")
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            op, _ = jax_backend.twin_hessian(model, loss, data, dtype="float32")
            out["conversion_s"] = time.perf_counter() - t0
            v = op.asarray(np.random.default_rng(0).standard_normal(op.n).astype(np.float32))
            t0 = time.perf_counter()
            np.asarray(op.matvec(v))
            out["first_product_s"] = time.perf_counter() - t0  # includes compilation
            t0 = time.perf_counter()
            np.asarray(op.matvec(v))
            out["wall_s"] = time.perf_counter() - t0
        out["peak_mb"] = mem.increase_mb
    else:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    return out


def run_stage(name: str, tiny: bool, timeout: float, device: str = "cpu") -> dict[str, Any]:
    """One stage in a fresh process; a failure is a row with its message."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--stage", name, "--device", device]
    cmd += ["--tiny"] if tiny else []
    t0 = time.perf_counter()
    print(f"[scale] {name} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"stage": name, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"stage": name, "status": "failed", "error": tail[0][:300]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["status"] = "ok"
    print(f"[scale] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return row


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def get(stage: str, key: str) -> Any:
        row = rows.get(stage, {})
        return row.get(key) if row.get("status") == "ok" else None

    out = []

    def target(what: str, value: Any, limit: float, unit: str, why: str = "") -> None:
        met = value is not None and value <= limit
        out.append({"target": what, "value": value, "limit": limit, "unit": unit,
                    "met": met, "note": "" if met else why})

    grad_s, grad_mb = get("gradient", "wall_s"), get("gradient", "peak_mb")
    prod_s, prod_mb = get("product", "wall_s"), get("product", "peak_mb")
    why_time = "double backward through the whole first-order graph"
    mm_prod, mm_grad = get("product", "matmul_s"), get("gradient", "matmul_s")
    if mm_prod and mm_grad:
        why_time = (
            f"the matrix products alone (mm/addmm/bmm, profiled) take {mm_prod / mm_grad:.2f}x "
            f"the gradient's: {get('product', 'matmul_calls')} calls, {mm_prod:.2f} s against "
            f"{get('gradient', 'matmul_calls')} calls, {mm_grad:.2f} s. A double backward "
            "differentiates each matrix product of the gradient's backward (two per linear "
            "layer, the output embedding's included) besides the forward's own")
    target("product time / gradient time", prod_s / grad_s if prod_s and grad_s else None,
           2.2, "x", why_time)
    why_memory = "the operator keeps the first-order graph (create_graph) for reuse across products"
    graph_mb, vec = get("product", "graph_mb"), get("product", "vector_mb")
    if graph_mb is not None and prod_mb and vec:
        why_memory = (
            f"the kept first-order graph ({graph_mb:.0f} MB) and the input vector ({vec:.0f} "
            f"MB) stay for every product; the double backward itself peaks "
            f"{prod_mb - graph_mb - vec:.0f} MB above them, against the whole gradient's "
            f"{grad_mb:.0f} MB")
    target("product peak memory / gradient peak memory",
           prod_mb / grad_mb if prod_mb and grad_mb else None, 2.5, "x", why_memory)
    target("top-1 to 1e-3, wall", get("top1_device", "wall_s"), 600.0, "s")
    disk, vec = get("top1_disk", "peak_mb"), get("top1_disk", "vector_mb")
    target("top-1 with basis='disk': peak memory above the product's (at most one vector)",
           (disk - prod_mb) if disk is not None and prod_mb is not None else None,
           vec or 0.0, "MB",
           "eigsh holds what the product stage holds (the operator, the vector being "
           "expanded and its product, orthogonalised in place) and the disk basis' 64 MB "
           "buffer; the rest is not attributed (the allocator's heap between products)")
    return out


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    n = next((r["n"] for r in rows.values() if "n" in r), None)
    lines = [
        f"# GPT-2 small on the {'CPU' if results.get('device', 'cpu') == 'cpu' else 'GPU'} "
        "(issue 25)",
        "",
        f"{results['model']}: {n:,} parameters (one vector: "
        f"{4 * n / 2**20:.0f} MB in float32), {BATCH} x {SEQ_LEN} tokens, random init, "
        f"float32; {results['threads']} threads; load average {results['load']}; "
        f"{results['date']}. Each stage in a fresh process; peak memory is the resident set's "
        "increase over its level once the model and data were built.",
        "",
        "| stage | wall (s) | products | peak memory increase (MB) | notes |",
        "|---|---|---|---|---|",
    ]
    for name in STAGES:
        r = rows.get(name, {"status": "not run"})
        if r.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | {r.get('status')}: {r.get('error', '')} |")
            continue
        notes = []
        if "build_s" in r:
            notes.append(f"operator built in {r['build_s']:.1f} s, first product "
                         f"{r['first_product_s']:.1f} s")
        if "conversion_s" in r:
            notes.append(f"export + conversion {r['conversion_s']:.1f} s, first product "
                         f"(compile) {r['first_product_s']:.1f} s")
        if "value" in r:
            notes.append(f"lambda_1 = {r['value']:.6g}, residual {r['residual']:.1e}, "
                         f"converged {r['converged']}")
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r.get('products', 1 if name != 'gradient' else '-')} "
                     f"| {r['peak_mb']:.0f} | {'; '.join(notes)} |")
    lines += ["", "The gradient and product times are the median of three calls after a "
              "warm-up one, the other stages single runs, on a shared machine (load average "
              "above): a call of a second or two can vary by 2x between runs.", ""]
    lines += ["| target | value | limit | met | why missed |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g} {t['unit']}"
        lines.append(f"| {t['target']} | {value} | {t['limit']:.3g} {t['unit']} | "
                     f"{'met' if t['met'] else 'missed'} | {t['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, help="run one stage here, print its JSON")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT-2 (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per stage")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the torch stages run (cuda: the GPU script's rows)")
    parser.add_argument("--from-json", type=Path,
                        help="rewrite scale.md (and the targets) from a scale.json, no run")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["targets"] = targets(results["rows"])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "scale.md").write_text(markdown(results))
        return 0
    if args.stage:
        print(json.dumps(stage(args.stage, args.tiny, args.device)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("benchmarks.scale --device cuda: no CUDA device here", file=sys.stderr)
            return 2
        args.stages = [s for s in args.stages if s != "jax_twin"]
    rows = {name: run_stage(name, args.tiny, args.timeout, args.device) for name in args.stages}
    results = {
        "model": "GPT-2 (tiny)" if args.tiny else "GPT-2 small",
        "threads": int(os.environ.get("OMP_NUM_THREADS", "2")),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "rows": rows,
    }
    results["targets"] = targets(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scale" if args.device == "cpu" else f"scale_{args.device}"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
