"""The JAX twin against PyTorch on the model families researchers analyse: one HVP each.

Run it with ``python -m benchmarks.twin`` (``--size tiny`` for the smoke test). Per family
(Hugging Face GPT-2, BERT and ViT from small configurations with random weights, a
ResNet-18 in torchvision's layout, a causal ``nn.TransformerEncoder`` LM) it records

- ``conversion_s``: ``jax_backend.from_torch`` with the loss (torch.export, decomposition,
  interpretation and the check against torch),
- ``build_s``: the JAX Hessian operator on top (its one-batch linearisation),
- ``torch_hvp_s`` and ``jax_hvp_s``: the median wall time of one Hessian-vector product
  (torch: ``torch_backend.hessian``'s own engine; JAX: the jitted twin, compiled first),
- ``jax_over_torch``: their ratio (below 1: the twin is faster), and ``max_rel_diff`` of
  the two products on the same vector (float64),

and writes ``benchmarks/results/twin.json`` and ``twin.md``. Everything runs in float64 on
the CPU. Another engineer owns ``benchmarks/run.py``; this suite stands alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SIZES", "FAMILIES", "run", "markdown", "main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: width, layers, heads, sequence length (or image size), batch
SIZES = {
    "tiny": {"width": 8, "layers": 1, "heads": 2, "seq": 6, "batch": 2, "image": 8,
             "resnet_width": 2, "repeats": 2},
    "small": {"width": 32, "layers": 2, "heads": 4, "seq": 32, "batch": 8, "image": 32,
              "resnet_width": 8, "repeats": 5},
}
VOCAB = 64


def _causal_lm_loss(out: Any, tokens: Any) -> Any:
    import torch.nn.functional as F

    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


def _logits_cross_entropy(out: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(out.logits, labels)


def _tokens(s: dict[str, int]) -> Any:
    import torch

    return torch.randint(0, VOCAB, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))


def gpt2(s: dict[str, int]) -> tuple[Any, Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=s["width"], n_layer=s["layers"], n_head=s["heads"],
                        vocab_size=VOCAB, n_positions=s["seq"], use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    tokens = _tokens(s)
    return GPT2LMHeadModel(config), ({"input_ids": tokens}, tokens), _causal_lm_loss


def bert(s: dict[str, int]) -> tuple[Any, Any, Any]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=s["width"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=2 * s["width"],
                        vocab_size=VOCAB, max_position_embeddings=s["seq"], num_labels=3,
                        attn_implementation="sdpa")
    tokens = _tokens(s)
    mask = torch.ones_like(tokens)
    mask[0, s["seq"] // 2:] = 0
    labels = torch.arange(s["batch"]) % 3
    return (BertForSequenceClassification(config),
            ({"input_ids": tokens, "attention_mask": mask}, labels), _logits_cross_entropy)


def vit(s: dict[str, int]) -> tuple[Any, Any, Any]:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=s["width"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], intermediate_size=2 * s["width"],
                       image_size=s["image"], patch_size=4, num_channels=3, num_labels=3,
                       attn_implementation="sdpa")
    images = torch.randn(s["batch"], 3, s["image"], s["image"],
                         generator=torch.Generator().manual_seed(0))
    labels = torch.arange(s["batch"]) % 3
    return ViTForImageClassification(config), ({"pixel_values": images}, labels), \
        _logits_cross_entropy


def resnet18(s: dict[str, int]) -> tuple[Any, Any, Any]:
    import torch

    from torch_backend.examples import make_resnet18

    model = make_resnet18(width=s["resnet_width"], num_classes=10, seed=0)
    images = torch.randn(s["batch"], 3, s["image"], s["image"],
                         generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, (images, torch.arange(s["batch"]) % 10), torch.nn.CrossEntropyLoss()


def transformer_encoder(s: dict[str, int]) -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, s["width"])
            layer = nn.TransformerEncoderLayer(s["width"], s["heads"], 2 * s["width"],
                                               dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, s["layers"], enable_nested_tensor=False)
            self.head = nn.Linear(s["width"], VOCAB)

        def forward(self, tokens: Any) -> Any:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1],
                                                                  dtype=self.head.weight.dtype)
            return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))

    torch.manual_seed(0)
    tokens = _tokens(s)
    return LM(), (tokens, tokens), _causal_lm_loss


FAMILIES: dict[str, Callable[[dict[str, int]], tuple[Any, Any, Any]]] = {
    "gpt2": gpt2, "bert": bert, "vit": vit, "resnet18": resnet18,
    "transformer_encoder": transformer_encoder,
}


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_family(name: str, size: str) -> dict[str, Any]:
    """One row: conversion, build and HVP times of the twin and of torch, and their ratio."""
    import jax
    import torch

    import torch_backend
    from jax_backend import from_torch
    from jax_backend.registry import JaxBackend

    s = SIZES[size]
    row: dict[str, Any] = {"family": name, "size": size}
    try:
        torch.manual_seed(0)
        model, data, loss = FAMILIES[name](s)
        model = model.to(torch.float64).eval()
        row["num_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        twin = from_torch(model, data[0], loss=loss, example_targets=data[1], dtype="float64")
        row["conversion_s"] = time.perf_counter() - t0
        row["num_operators"] = len(twin.operators)
        row["decomposition"] = twin.decomposition
        t0 = time.perf_counter()
        op_jax, _ = JaxBackend().twin_hessian(model, loss, data, dtype="float64")
        row["build_s"] = time.perf_counter() - t0
        op_torch = torch_backend.hessian(model, loss, data, dtype=torch.float64)
        row["torch_method"] = op_torch.method
        v = np.random.default_rng(0).standard_normal(op_torch.n)
        v_torch, v_jax = torch.as_tensor(v), op_jax.asarray(v)
        out_torch = op_torch.matvec(v_torch)
        out_jax = jax.block_until_ready(op_jax.matvec(v_jax))  # compiles
        repeats = s["repeats"]
        row["torch_hvp_s"] = _median_time(lambda: op_torch.matvec(v_torch), repeats)
        row["jax_hvp_s"] = _median_time(
            lambda: jax.block_until_ready(op_jax.matvec(v_jax)), repeats)
        row["jax_over_torch"] = row["jax_hvp_s"] / row["torch_hvp_s"]
        a, b = out_torch.detach().numpy(), np.asarray(out_jax)
        row["max_rel_diff"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        row["status"] = "ok"
    except ImportError as exc:
        row.update(status="skipped", error=f"{exc} (pip install transformers)")
    except Exception as exc:  # noqa: BLE001 - a failing family is a row, never dropped
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        row["traceback"] = traceback.format_exc(limit=3)
    return row


def run(size: str = "small", families: tuple[str, ...] = tuple(FAMILIES),
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import jax
    import torch

    jax.config.update("jax_enable_x64", True)
    rows = []
    for name in families:
        log(f"[twin benchmark] {name} ({size})")
        rows.append(bench_family(name, size))
    return {
        "suite": "twin", "size": size, "sizes": SIZES[size], "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "jax": jax.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average": list(os.getloadavg())},
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# JAX twin vs PyTorch: one Hessian-vector product (float64, size `{results['size']}`)",
        "",
        "`python -m benchmarks.twin`. Conversion: `jax_backend.from_torch` with the loss "
        "(torch.export, decomposition, interpretation, check). Build: the JAX Hessian "
        "operator. HVP: median wall time of one product after compilation.",
        "",
        "| family | parameters | ATen ops | conversion (s) | build (s) | torch HVP (ms) "
        "| JAX twin HVP (ms) | JAX / torch | rel. diff | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['family']} | | | | | | | | | {r['status']}: {r.get('error', '')} |")
            continue
        lines.append(
            f"| {r['family']} | {r['num_params']:,} | {r['num_operators']} | "
            f"{r['conversion_s']:.2f} | {r['build_s']:.2f} | {1e3 * r['torch_hvp_s']:.2f} | "
            f"{1e3 * r['jax_hvp_s']:.2f} | {r['jax_over_torch']:.2f} | "
            f"{r['max_rel_diff']:.1e} | ok |"
        )
    m = results["machine"]
    lines += ["", f"Machine: {m['platform']}, torch {m['torch']} ({m['torch_threads']} threads), "
              f"jax {m['jax']}."]
    if "load_average" in m:
        lines.append(f"Load average at the end (1, 5, 15 min): "
                     f"{', '.join(f'{x:.1f}' for x in m['load_average'])} (a shared machine "
                     "inflates the times; the ratios are indicative).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results = run(args.size, tuple(args.families.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "twin.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "twin.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
