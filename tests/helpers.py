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


def raising_factory() -> nn.Module:
    raise RuntimeError("the weights server is unreachable")


def needs_argument(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width))


def headless_factory() -> nn.Module:
    """No linear classifier to replace by the new head."""
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def bad_forward_factory() -> nn.Module:
    """Its first layer expects 100 features; an 8 x 8 image has 64."""
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 16), nn.ReLU(), nn.Linear(16, 3))


NOT_CALLABLE = 3


def fails_in_workers() -> nn.Module:
    """A factory that works in the test's own process (``TTP_HELPERS_DRIVER_PID``) and raises a one-line input error
    anywhere else (a Ray worker): bad input that only a worker finds."""
    import os

    if os.environ.get("TTP_HELPERS_DRIVER_PID") != str(os.getpid()):
        raise ValueError("model: this factory runs only in the driver (test hook)")
    return tiny_factory()
