"""Analysis of a sweep's output for people (see :mod:`ttp_ray.analysis.metrics`); re-exports its names."""
from .metrics import *  # noqa: F401,F403
from .metrics import __all__  # noqa: F401
