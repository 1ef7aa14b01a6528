"""A dualhess model file (PyTorch): a small MLP on scikit-learn's digits.

Run it with::

    dualhess analyze examples/torch_mlp.py

dualhess imports this file and calls ``model()``, ``loss()`` and ``data()``. The Hessian is
that of the mean loss over every sample that ``data()`` returns; the model is analysed in
PyTorch and, through its Flax/JAX twin with the same weights, in JAX, and the two are
crosschecked.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

NUM_SAMPLES = 128


def data():
    """One batch ``(inputs, targets)``; a list of batches or a DataLoader (shuffle=False)
    works too."""
    digits = load_digits()
    X = torch.tensor(digits.data[:NUM_SAMPLES] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:NUM_SAMPLES], dtype=torch.long)
    return X, y


def model():
    """Any nn.Module (in eval mode if it has Dropout or BatchNorm); here trained briefly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    X, y = data()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        loss()(net(X), y).backward()
        opt.step()
    return net.eval()


def loss():
    """A torch loss module; its reduction ("mean" or "sum") is honoured."""
    return nn.CrossEntropyLoss()
