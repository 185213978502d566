"""A user-model factory for the ``package.module:function`` backbone form."""
from torch import nn


def tiny_factory() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    return net


def not_a_module():
    return 42
