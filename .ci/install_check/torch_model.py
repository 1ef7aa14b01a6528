"""A tiny PyTorch model file for the install check (.ci/test_install.py): no scikit-learn,
no download. Random inputs and labels, a 4-3-2 tanh MLP, float64."""

import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()


def loss():
    return nn.CrossEntropyLoss()


def data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 2, (32,), generator=generator)
