"""Where gradient descent on the linearised model is stable (docs/METHOD.md §2, §3, §11).

The one home of the stability limit ``2(1+m) N / lambda_max`` and of the loss curvature bound that the
momentum resolution (ELR or exact heavy ball) tests against. Every limit in ttp-ray comes from
:func:`max_stable_lr`; callers say which ``lambda_max`` they pass (the class-trace or the full kernel's,
a subset's extrapolated spectrum's, a re-linearised sketch's power iteration).
"""
from __future__ import annotations

__all__ = ["max_stable_lr", "hessian_bound", "elr_stability_ratio"]


def max_stable_lr(lam_max: float, n: float, momentum: float = 0.0) -> float:
    """Largest stable lr of heavy-ball GD on the linearised MSE model, ``2(1+m) N / lambda_max``
    (docs/METHOD.md §2): the map diverges once ``lr lambda_max / N > 2(1+m)``. ``lam_max`` is the largest
    eigenvalue of Θ itself (not divided by N); ``inf`` when it is not positive."""
    return float("inf") if lam_max <= 0 else 2.0 * (1.0 + momentum) * n / lam_max


def hessian_bound(loss: str) -> float:
    """Largest eigenvalue of the per-sample loss Hessian in the outputs: 1 for MSE, 1/2 for softmax CE."""
    return 1.0 if loss == "mse" else 0.5


def elr_stability_ratio(effective_lr: float, lam_max: float, n: float, loss: str) -> float:
    """``x = eta_eff lambda_max h / N`` (docs/METHOD.md §11): the ELR map (plain GD at ``eta / (1 - m)``) is
    unstable from ``x >= 2`` on, where heavy ball at ``(eta, m)`` may still be stable."""
    return effective_lr * lam_max * hessian_bound(loss) / n
