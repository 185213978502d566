"""The one error type of the analysis: bad input, reported as one line naming the field and what is allowed."""
from __future__ import annotations

__all__ = ["AnalysisError"]


class AnalysisError(ValueError):
    """Bad input to the analysis: one line naming the field and what is allowed (CLI: exit code 2)."""
