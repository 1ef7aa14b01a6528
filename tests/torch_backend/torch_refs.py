"""Shared helpers (torch_backend tests): digits data, small trained models, dense references."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch_backend.examples import MODELS, load_digits, train  # noqa: E402

torch.set_num_threads(1)  # the test machine is small and shared

NUM_SAMPLES = 128
#: small sizes keep the dense float64 references cheap (n <= ~650 parameters)
SIZES = {"mlp": 8, "cnn": 2, "bn_cnn": 2, "residual": 6, "layernorm_mlp": 8, "groupnorm_cnn": 2}


@functools.cache
def digits(flat: bool, n: int = NUM_SAMPLES):
    return load_digits(torch.float64, n=n, flat=flat)


@functools.cache
def trained(name: str):
    """A briefly, deterministically trained float64 model and its inputs (eval mode)."""
    make, flat = MODELS[name]
    X, y = digits(flat)
    model = train(make(SIZES[name], seed=0), (X, y), steps=30, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, X, y


def flat_params(model, names=None):
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def flat_loss_fn(model, loss_fn, inputs, targets, names=None):
    """``theta -> loss`` on a flat vector of the named parameters (others fixed)."""
    names, theta = flat_params(model, names)
    named = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}

    def f(theta):
        parts, start = {}, 0
        for n in names:
            size = named[n].numel()
            parts[n] = theta[start : start + size].reshape(named[n].shape)
            start += size
        out = torch.func.functional_call(model, {**fixed, **parts}, (inputs,))
        return loss_fn(out, targets)

    return f, theta


def dense_hessian(model, loss_fn, inputs, targets, names=None):
    """Exact dense Hessian by double backward (torch.autograd.functional.hessian), symmetric."""
    f, theta = flat_loss_fn(model, loss_fn, inputs, targets, names)
    theta = theta.clone().requires_grad_(True)
    grad = torch.autograd.grad(f(theta), theta, create_graph=True)[0]
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    try:  # rows of H in blocks by batched double backward
        rows = [
            torch.autograd.grad(
                grad, theta, eye[i : i + 128], retain_graph=True, is_grads_batched=True
            )[0]
            for i in range(0, theta.numel(), 128)
        ]
    except RuntimeError:  # batched double backward is missing for some layers (GroupNorm)
        rows = [torch.autograd.grad(grad, theta, e, retain_graph=True)[0] for e in eye]
    H = torch.cat([r.reshape(-1, theta.numel()) for r in rows]).detach()
    asym = (H - H.T).abs().max() / H.abs().max()
    assert asym < 1e-12, f"reference Hessian is not symmetric ({asym:.2e})"
    return H


@functools.cache
def reference(name: str):
    model, X, y = trained(name)
    return dense_hessian(model, torch.nn.CrossEntropyLoss(), X, y)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def assert_clean(model):
    """No .grad and no hooks anywhere on a user's model."""
    for n, p in model.named_parameters():
        assert p.grad is None, f"{n} has a .grad"
    for name, m in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            assert not getattr(m, attr, {}), f"{name or '<root>'} has {attr}"
        assert not getattr(m, "_backpack_extend", False), f"{name} was extended by BackPACK"
