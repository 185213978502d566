"""The empirical NTK of a fine-tuning model (moved to a package; the code is in :mod:`.estimators`)."""
from .estimators import *  # noqa: F401,F403
from .estimators import __all__  # noqa: F401
