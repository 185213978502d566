"""A user-model factory for the ``package.module:function`` backbone form."""
from torch import nn


def tiny_factory() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    return net


def not_a_module():
    return 42


def four_channel_factory() -> nn.Module:
    """A backbone whose first convolution takes 4 channels (RGBA-like): 3-channel images cannot be adapted to it."""
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
