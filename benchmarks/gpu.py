"""GPU benchmark: ResNet-18, a wide MLP (torch and JAX) and a ~370M-parameter transformer LM.

Run on a machine with a CUDA GPU (under 5 minutes on an H200-class GPU)::

    python -m benchmarks.gpu                  # all models, writes benchmarks/results/gpu.{json,md}
    python -m benchmarks.gpu --models resnet18 --out /tmp/gpu
    python -m benchmarks.gpu --models gpt2_small   # GPT-2 small's rows (benchmarks.scale)

Without a CUDA device it exits with status 2 and a message. ``--allow-cpu --tiny`` runs the
same code path on tiny models on the CPU (to check the script, not to measure anything).

Everything runs in float32 with TF32 off. Per model it measures one gradient, one HVP per
method (``func``, ``autograd``, ``pyhessian``, ``auto``), ``matmat`` time per HVP at chunk
sizes 1, 8, 32, 64 with the peak memory (``torch.cuda.max_memory_allocated``) of each, the
top-10 eigenvalues to residual 1e-4 (plain, and block eigsh with ``block_size`` = the fastest
chunk size, at most 16), a 100-matvec trace, 1 x 100 and 10 x 100 densities,
and the same with PyHessian (top-10 at tol 1e-3, 100-probe trace, density: which fails on
torch >= 1.9 because it calls the removed ``torch.eig``; recorded as a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHUNK_SIZES = (1, 8, 32, 64)


# ---------------------------------------------------------------------- models
def resnet18(num_classes: int = 10, width: int = 64) -> Any:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2])."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            out = self.bn1(self.conv1(x)).relu()
            return (self.bn2(self.conv2(out)) + self.short(x)).relu()

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if i == 0 else 2
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def language_model(vocab: int = 32_000, d_model: int = 1024, layers: int = 24, heads: int = 16,
                   seq: int = 128) -> Any:
    """A causal ``nn.TransformerEncoder`` LM; ``forward(tokens) -> (batch * seq, vocab)`` logits."""
    import torch
    from torch import nn

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(torch.zeros(seq, d_model))
            layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

        def forward(self, tokens: Any) -> Any:
            h = self.embed(tokens) + self.pos[: tokens.shape[1]]
            h = self.encoder(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
            return self.head(h).reshape(-1, vocab)

    return LM()


def build(name: str, device: Any, tiny: bool) -> tuple[Any, Any, Any]:
    """``(model, (inputs, targets), loss_fn)`` in float32 on ``device``, eval mode."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet18":
        batch = 4 if tiny else 128
        model = resnet18(width=4 if tiny else 64)
        X = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    elif name == "mlp":
        batch, sizes = (8, (3072, 16, 16, 10)) if tiny else (128, (3072, 1024, 1024, 10))
        model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]),
                              nn.ReLU(), nn.Linear(sizes[2], sizes[3]))
        X = torch.randn(batch, sizes[0], generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    elif name == "transformer":
        vocab, d, L, heads, seq, batch = (100, 16, 2, 2, 8, 2) if tiny else (32_000, 1024, 24, 16, 128, 8)
        model = language_model(vocab, d, L, heads, seq)
        X = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.randint(0, vocab, (batch * seq,), generator=g)
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, (X.to(device), y.to(device)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------------- timing
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[Any, float]:
    """``(last result, median seconds)`` with CUDA synchronisation around each call."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


@contextlib.contextmanager
def peak_memory() -> Any:
    """Yields a dict whose ``"bytes"`` is the peak CUDA memory allocated inside the block."""
    import torch

    box: dict[str, Any] = {"bytes": None}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield box
    finally:
        if torch.cuda.is_available():
            _sync()
            box["bytes"] = int(torch.cuda.max_memory_allocated())


def guarded(record: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception (OOM included) record it under ``key`` and go on."""
    import torch

    try:
        return fn()
    except Exception as exc:
        record[key] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:300]}
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return None


# ---------------------------------------------------------------------- one model
def bench_torch(name: str, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import torch_backend
    from dualhess._density import density
    from dualhess._eigsh import eigsh
    from dualhess._trace import trace

    model, data, loss_fn = build(name, device, args.tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    rec: dict[str, Any] = {"model": name, "n": n, "framework": "torch"}
    X, y = data

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(X), y), params)

    with peak_memory() as mem:
        _, rec["gradient_s"] = timed(gradient)
    rec["gradient_peak_bytes"] = mem["bytes"]

    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, generator=g).to(device)
    ops: dict[str, Any] = {}
    for method in ("func", "autograd", "pyhessian", "auto"):
        def one(method: str = method) -> None:
            op = torch_backend.hessian(model, loss_fn, data, method=method, check_deterministic=False)
            ops[method] = op
            with peak_memory() as mem:
                _, seconds = timed(lambda: op.matvec(v))
            rec[f"hvp_{method}"] = {"seconds": seconds, "ratio_to_gradient": seconds / rec["gradient_s"],
                                    "peak_bytes": mem["bytes"], "picked": op.method}
        guarded(rec, f"hvp_{method}", one)
    op = ops.get("auto") or ops.get("func") or ops.get("autograd")
    if op is None:
        return rec

    chunks = CHUNK_SIZES if name != "transformer" or args.tiny else (1, 8)
    for c in chunks:
        def chunk(c: int = c) -> None:
            V = torch.randn(n, c, generator=g).to(device)
            op.chunk_size = c
            with peak_memory() as mem:
                _, seconds = timed(lambda: op.matmat(V), repeats=2)
            rec[f"matmat_chunk_{c}"] = {"seconds_per_hvp": seconds / c, "peak_bytes": mem["bytes"]}
        guarded(rec, f"matmat_chunk_{c}", chunk)
    per_hvp = {c: rec[f"matmat_chunk_{c}"]["seconds_per_hvp"] for c in chunks
               if "seconds_per_hvp" in rec.get(f"matmat_chunk_{c}", {})}
    best = min(per_hvp, key=per_hvp.get) if per_hvp else None
    op.chunk_size = best
    rec["chunk_size_used"] = best

    def run(label: str, fn: Callable[[], Any], summary: Callable[[Any], dict[str, Any]]) -> None:
        def go() -> None:
            start_count = op.num_matvecs
            with peak_memory() as mem:
                start = time.perf_counter()
                result = fn()
                _sync()
                seconds = time.perf_counter() - start
            rec[label] = {"seconds": seconds, "num_matvecs": op.num_matvecs - start_count,
                          "peak_bytes": mem["bytes"], **summary(result)}
        guarded(rec, label, go)

    k = 2 if args.tiny else 10
    steps, probes = (5 if args.tiny else 100), (2 if args.tiny else 10)
    run("dualhess_top10", lambda: eigsh(op, k, tol=1e-4, seed=0, return_vectors=False),
        lambda e: {"values": e.values.tolist(), "converged": bool(np.all(e.converged))})
    # Block Krylov: block_size columns per operator call (one vmapped/batched product).
    block = min(best or 1, 2 if args.tiny else 16)
    rec["top10_block_size"] = block
    run("dualhess_top10_block", lambda: eigsh(op, k, tol=1e-4, seed=0, return_vectors=False,
                                              block_size=block),
        lambda e: {"values": e.values.tolist(), "converged": bool(np.all(e.converged))})
    run("dualhess_trace100", lambda: trace(op, num_matvecs=20 if args.tiny else 100, seed=0),
        lambda t: {"value": t.value, "stderr": t.stderr})
    run("dualhess_density_1", lambda: density(op, num_probes=1, num_steps=steps, seed=0), lambda d: {})
    run(f"dualhess_density_{probes}", lambda: density(op, num_probes=probes, num_steps=steps, seed=0),
        lambda d: {})
    one, many = rec.get("dualhess_density_1", {}), rec.get(f"dualhess_density_{probes}", {})
    if "seconds" in one and "seconds" in many:
        rec["density_ratio_many_to_one"] = many["seconds"] / one["seconds"]
    if not args.skip_pyhessian and not (name == "transformer" and not args.tiny):
        rec.update(bench_pyhessian(model, data, loss_fn, k, steps, probes))
    return rec


def bench_pyhessian(model: Any, data: Any, loss_fn: Any, k: int, steps: int, probes: int) -> dict[str, Any]:
    """PyHessian 0.1 on the same model: top-k (tol 1e-3), 100-probe trace, density."""
    import importlib

    import torch

    out: dict[str, Any] = {}
    ph = importlib.import_module("pyhessian.hessian")
    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*a: Any) -> Any:
        count["n"] += 1
        return original(*a)

    ph.hessian_vector_product = counted
    cuda = next(model.parameters()).is_cuda
    try:
        for label, call in (
            (f"pyhessian_top{k}", lambda h: h.eigenvalues(top_n=k, tol=1e-3)[0]),
            ("pyhessian_trace100", lambda h: float(np.mean(h.trace(maxIter=100, tol=0.0)))),
            ("pyhessian_density_1", lambda h: h.density(iter=steps, n_v=1)),
        ):
            count["n"] = 0
            try:
                torch.manual_seed(0)
                h = ph.hessian(model, loss_fn, data=data, cuda=cuda)
                with peak_memory() as mem:
                    start = time.perf_counter()
                    value = call(h)
                    _sync()
                    seconds = time.perf_counter() - start
                out[label] = {"seconds": seconds, "num_matvecs": count["n"], "peak_bytes": mem["bytes"],
                              "value": value if isinstance(value, float) else list(map(float, value))}
            except Exception as exc:
                out[label] = {"status": "failed", "num_matvecs": count["n"],
                              "error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                model.zero_grad(set_to_none=True)
    finally:
        ph.hessian_vector_product = original
    return out


def bench_jax_mlp(args: argparse.Namespace) -> dict[str, Any]:
    """The MLP in JAX: jitted gradient, one HVP, matmat per chunk size (float32)."""
    import jax
    import jax.numpy as jnp

    import jax_backend

    rec: dict[str, Any] = {"model": "mlp", "framework": "jax", "devices": [str(d) for d in jax.devices()]}
    if jax.default_backend() == "cpu" and not args.allow_cpu:
        rec["status"] = "skipped: jax has no GPU backend here (install jax[cuda])"
        return rec
    sizes, batch = ((3072, 16, 16, 10), 8) if args.tiny else ((3072, 1024, 1024, 10), 128)
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.standard_normal((a, b)) / math.sqrt(a), jnp.float32),
               "b": jnp.zeros(b, jnp.float32)} for a, b in zip(sizes[:-1], sizes[1:])]
    X = jnp.asarray(rng.standard_normal((batch, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch))

    def loss_fn(p: Any, b: Any) -> Any:
        x, labels = b
        for i, layer in enumerate(p):
            x = x @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        logp = jax.nn.log_softmax(x)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    grad = jax.jit(jax.grad(loss_fn))
    _, rec["gradient_s"] = timed(lambda: jax.block_until_ready(grad(params, (X, y))), warmup=2)
    op = jax_backend.hessian(loss_fn, params, (X, y))
    v = op.asarray(rng.standard_normal(op.n))
    _, seconds = timed(lambda: jax.block_until_ready(op.matvec(v)), warmup=2)
    rec["n"] = op.n
    rec["hvp"] = {"seconds": seconds, "ratio_to_gradient": seconds / rec["gradient_s"]}
    for c in CHUNK_SIZES:
        def chunk(c: int = c) -> None:
            V = op.asarray(rng.standard_normal((op.n, c)))
            op.chunk_size = c
            _, s = timed(lambda: jax.block_until_ready(op.matmat(V)), warmup=1, repeats=2)
            rec[f"matmat_chunk_{c}"] = {"seconds_per_hvp": s / c}
        guarded(rec, f"matmat_chunk_{c}", chunk)
    return rec


# ---------------------------------------------------------------------- targets and output
def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["model"], r["framework"]): r for r in results}

    def add(name: str, goal: str, value: float | None, limit: float, fmt: str) -> None:
        met = None if value is None else value <= limit
        out.append({"target": name, "goal": goal, "measured": None if value is None else fmt.format(value),
                    "met": met})

    def get(rec: dict[str, Any] | None, *keys: str) -> float | None:
        for key in keys:
            if not isinstance(rec, dict) or key not in rec:
                return None
            rec = rec[key]
        return rec  # type: ignore[return-value]

    r = by.get(("resnet18", "torch"))
    per = [get(r, f"matmat_chunk_{c}", "seconds_per_hvp") for c in CHUNK_SIZES]
    per = [p for p in per if p is not None]
    add("ResNet-18 matmat per HVP", "<= 1.5 ms", 1e3 * min(per) if per else None, 1.5, "{:.2f} ms")
    add("ResNet-18 top-10 (residual 1e-4)", "<= 0.5 s", get(r, "dualhess_top10", "seconds"), 0.5, "{:.2f} s")
    add("ResNet-18 top-10, block eigsh (residual 1e-4)", "<= 0.5 s",
        get(r, "dualhess_top10_block", "seconds"), 0.5, "{:.2f} s")
    add("ResNet-18 100-matvec trace", "<= 0.5 s", get(r, "dualhess_trace100", "seconds"), 0.5, "{:.2f} s")
    add("ResNet-18 10x100 density", "<= 3 s", get(r, "dualhess_density_10", "seconds"), 3.0, "{:.2f} s")
    add("ResNet-18 density 10 probes / 1 probe", "<= 3x", get(r, "density_ratio_many_to_one"), 3.0, "{:.2f}x")
    t = by.get(("transformer", "torch"))
    add("transformer HVP / gradient", "<= 2.5x", get(t, "hvp_auto", "ratio_to_gradient"), 2.5, "{:.2f}x")
    total = None
    parts = [get(t, k, "seconds") for k in ("dualhess_top10", "dualhess_trace100", "dualhess_density_10")]
    if all(p is not None for p in parts):
        total = sum(parts)  # type: ignore[arg-type]
    add("transformer full report (top-10, trace, 10x100 density)", "<= 120 s", total, 120.0, "{:.1f} s")
    for rec in results:
        hvp = get(rec, "hvp_auto", "peak_bytes")
        for c in CHUNK_SIZES:
            peak = get(rec, f"matmat_chunk_{c}", "peak_bytes")
            if hvp and peak and c > 1:
                add(f"{rec['model']} peak memory, chunk {c}", "<= chunk x one HVP's", peak / (c * hvp),
                    1.0, "{:.2f} of the limit")
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# dualhess GPU benchmark ({report['device']})", "",
             f"torch {report['torch']}, float32, TF32 off; total {report['total_s']:.0f} s.", "",
             "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured'] or ''} | {met} |")
    for rec in report["results"]:
        lines += ["", f"## {rec['model']} ({rec['framework']}, n = {rec.get('n')})", "", "```",
                  json.dumps(rec, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,mlp,transformer")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (checks the code path)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (with --allow-cpu)")
    parser.add_argument("--skip-pyhessian", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("benchmarks.gpu: no CUDA device found (torch.cuda.is_available() is False). "
              "Run it on a machine with an NVIDIA GPU, or pass --allow-cpu --tiny to check the "
              "script on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    start = time.perf_counter()
    results = []
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if "gpt2_small" in names:
        # The CPU scale benchmark's stages (gradient, product, top-1 with the basis on the
        # device and on disk) on this device, each in a fresh process: scale_cuda.{json,md}.
        from benchmarks import scale

        scale_args = ["--out", str(args.out), "--device", device.type]
        tiny = ["--tiny", "--stages", "gradient", "product"] if args.tiny else []
        status = scale.main(scale_args + tiny)
        results.append({"model": "gpt2_small", "framework": "torch",
                        "status": "ok" if status == 0 else "failed",
                        "note": f"rows in scale_{device.type}.md" if device.type != "cpu"
                        else "rows in scale.md"})
        names.remove("gpt2_small")
    for name in names:
        t0 = time.perf_counter()
        try:
            results.append(bench_torch(name, device, args))
        except Exception:
            results.append({"model": name, "framework": "torch", "status": "failed",
                            "error": traceback.format_exc()[-1500:]})
        if name == "mlp":
            try:
                results.append(bench_jax_mlp(args))
            except Exception:
                results.append({"model": "mlp", "framework": "jax", "status": "failed",
                                "error": traceback.format_exc()[-1500:]})
        print(f"[{time.perf_counter() - start:6.1f}s] {name} done in {time.perf_counter() - t0:.1f}s",
              flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "results": results,
        "targets": targets(results), "total_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if torch.cuda.is_available() and not args.tiny else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
