"""Small, reusable digits models for tests, examples and the CLI.

The data are scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download). The
models are small enough that their dense Hessian is cheap (a few hundred to ~1500 parameters)
and are trained briefly and deterministically with :func:`train`.

Examples
--------
>>> import torch
>>> from torch_backend.examples import load_digits, make_mlp, train
>>> X, y = load_digits(n=128, flat=True)
>>> model = train(make_mlp(), (X, y), steps=20, seed=0)
>>> X.shape, sum(p.numel() for p in model.parameters())
(torch.Size([128, 64]), 1210)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "load_digits",
    "make_mlp",
    "make_cnn",
    "make_bn_cnn",
    "make_residual",
    "make_layernorm_mlp",
    "make_groupnorm_cnn",
    "ResidualMLP",
    "ResNet18",
    "BasicBlock",
    "make_resnet18",
    "train",
    "MODELS",
    "demo_problem",
]


def load_digits(
    dtype: torch.dtype = torch.float64, n: int | None = None, *, flat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as tensors: images ``(N, 1, 8, 8)`` (or ``(N, 64)``), labels ``(N,)``.

    Pixels are scaled to ``[0, 1]``; ``n`` keeps the first ``n`` samples (fixed order).
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    X = torch.as_tensor(bunch.data / 16.0, dtype=dtype)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if n is not None:
        X, y = X[:n], y[:n]
    return (X if flat else X.reshape(-1, 1, 8, 8)), y


def _init(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            bound = 1.0 / fan_in**0.5
            p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=gen))
    return model.to(dtype)


def make_mlp(hidden: int = 16, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """MLP on flat digits: ``Linear(64, hidden) - Tanh - Linear(hidden, 10)``."""
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    return _init(model, seed, dtype)


def make_cnn(channels: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """CNN on ``(N, 1, 8, 8)``: ``Conv(1, c, 3, pad 1) - ReLU - AvgPool(2) - Flatten - Linear``."""
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * channels, 10),
    )
    return _init(model, seed, dtype)


def make_bn_cnn(
    channels: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """CNN with BatchNorm: ``Conv - BatchNorm2d - ReLU - AvgPool - Flatten - Linear``."""
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * channels, 10),
    )
    return _init(model, seed, dtype)


def make_groupnorm_cnn(
    channels: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """CNN with GroupNorm: ``Conv - GroupNorm(2) - Tanh - AvgPool - Flatten - Linear``."""
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(2, channels),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * channels, 10),
    )
    return _init(model, seed, dtype)


def make_layernorm_mlp(
    hidden: int = 8, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """MLP with LayerNorm: ``Linear(64, h) - LayerNorm(h) - Tanh - Linear(h, 10)``."""
    model = nn.Sequential(
        nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 10)
    )
    return _init(model, seed, dtype)


class ResidualMLP(nn.Module):
    """``Linear(64, h) - Tanh``, one residual block ``x + Linear(Tanh(Linear(x)))``, head."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(64, hidden), nn.Tanh())
        self.block = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(torch.tanh(h))


def make_residual(
    hidden: int = 8, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """A residual MLP on flat digits (see :class:`ResidualMLP`)."""
    return _init(ResidualMLP(hidden), seed, dtype)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions with BatchNorm, identity shortcut or a
    1x1 strided convolution + BatchNorm (``downsample``) when the shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 in torchvision's layout (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``;
    the same parameter names), with the base width as a parameter (torchvision: 64).
    ``stem="cifar"`` is the usual small-image variant: a 3x3 stride-1 ``conv1`` and no max
    pooling (``maxpool`` is an ``nn.Identity``), the parameter names unchanged.

    Written here rather than imported: torchvision from PyPI does not load beside every torch
    build, and dualhess needs no torchvision.
    """

    def __init__(
        self, width: int = 64, num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet"
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_resnet18(
    width: int = 8,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    stem: str = "cifar",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    running_stats: bool = True,
) -> nn.Module:
    """A ResNet-18 (torchvision's layout, :class:`ResNet18`) in eval mode, for 32x32 images.

    ``width=8`` gives 176,402 parameters for 10 classes (``stem="cifar"``; ``"imagenet"`` has
    torchvision's 7x7 stride-2 ``conv1`` and max pooling). With ``running_stats`` the BatchNorm
    running means and variances are set to non-trivial values (drawn from ``seed``), so an
    eval-mode analysis does not silently equal one with fresh statistics.

    Examples
    --------
    >>> from torch_backend.examples import make_resnet18
    >>> sum(p.numel() for p in make_resnet18(width=8).parameters())
    176402
    """
    model = _init(ResNet18(width, num_classes, in_channels, stem), seed, dtype)
    if running_stats:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen, dtype=dtype))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen, dtype=dtype))
    return model.eval()


#: name -> (constructor, whether it takes flat inputs)
MODELS = {
    "mlp": (make_mlp, True),
    "cnn": (make_cnn, False),
    "bn_cnn": (make_bn_cnn, False),
    "residual": (make_residual, True),
    "layernorm_mlp": (make_layernorm_mlp, True),
    "groupnorm_cnn": (make_groupnorm_cnn, False),
}


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int = 50,
    seed: int = 0,
    *,
    lr: float = 0.5,
    batch_size: int = 64,
) -> nn.Module:
    """Train ``model`` in place with plain SGD on cross-entropy, deterministically.

    Mini-batches are drawn with a ``torch.Generator`` seeded by ``seed``; the model is left in
    eval mode (BatchNorm running statistics are updated during training).
    """
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        idx = torch.randperm(X.shape[0], generator=gen)[:batch_size]
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model


# ---------------------------------------------------------------------- the demo
#: Convolution channels of the demo CNN (2730 parameters).
DEMO_CHANNELS = 16
#: SGD steps of the deterministic training (mini-batches of 64, learning rate 0.5).
DEMO_TRAIN_STEPS = 300
#: Samples in the data set of the Hessian (the first ones of digits; training uses all).
DEMO_SAMPLES = 256


def demo_problem(
    *,
    seed: int = 0,
    dtype: str = "float64",
    train_steps: int = DEMO_TRAIN_STEPS,
    num_samples: int = DEMO_SAMPLES,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The embedded default of ``dualhess analyze``: build and train the demo CNN.

    Returns ``(model, loss_fn, data, info)``.

    Parameters
    ----------
    seed : int
        Seeds the initialisation and the mini-batch order: same seed, same weights.
    dtype : {"float64", "float32"}
        The model and data are trained in float64 and then cast.
    train_steps : int
        SGD steps.
    num_samples : int
        How many digits (the first ones) make the data set of the Hessian.
    log : callable, optional
        Receives one line describing the model.

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    loss_fn : torch.nn.CrossEntropyLoss
    data : (inputs, targets)
        Inputs ``(num_samples, 1, 8, 8)``, integer targets.
    info : dict
        ``description``, ``num_params``, ``train_steps``, ``num_samples``, ``train_accuracy``.
    """
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    X, y = load_digits()
    model = make_cnn(DEMO_CHANNELS, seed=seed)
    train(model, (X, y), steps=train_steps, seed=seed)
    model.eval()
    accuracy = float((model(X).argmax(dim=1) == y).double().mean())
    X, y = X[:num_samples], y[:num_samples]
    if dtype == "float32":
        model = model.float()
        X = X.float()
    loss_fn = nn.CrossEntropyLoss()
    num_params = sum(p.numel() for p in model.parameters())
    info = {
        "description": (
            f"CNN Conv(1,{DEMO_CHANNELS},3)-ReLU-AvgPool(2)-Linear({DEMO_CHANNELS * 16},10) on "
            f"scikit-learn digits, trained {train_steps} SGD steps (seed {seed}); Hessian of the "
            f"mean cross-entropy over the first {num_samples} digits"
        ),
        "num_params": int(num_params),
        "train_steps": int(train_steps),
        "num_samples": int(num_samples),
        "train_accuracy": accuracy,
    }
    if log is not None:
        log(f"demo: {info['description']}; {num_params} parameters, training accuracy "
            f"{accuracy:.3f}")
    return model, loss_fn, (X, y), info
