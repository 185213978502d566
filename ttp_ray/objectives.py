"""Losses, their output gradients and the training error, in the one convention the trainer and the
predictor share (METHOD.md §1).

Conventions (stated once, used everywhere):

* outputs ``F`` have shape ``(N, C)``; targets are integer labels ``y`` of shape ``(N,)``;
* ``mse``: per-sample loss ``l_i = 1/2 * ||f_i - onehot(y_i)||^2`` summed over the C classes, and the
  dataset loss is the mean over samples, ``L = (1/N) sum_i l_i``. Note that ``nn.MSELoss()`` would
  average over N*C elements and scale the gradient by 1/C; we never use it;
* ``ce``: ``l_i = -log softmax(f_i)[y_i]``, mean over samples (``F.cross_entropy``);
* the per-sample output gradient ``G = dl_i/df_i`` is ``F - Y`` (mse) or ``softmax(F) - Y`` (ce), so a
  gradient-descent step on the *linearised* model is ``F <- F - (eta/N) Theta G`` (METHOD.md §2);
* error: the fraction of samples whose arg-max output is not the label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

__all__ = ["LOSSES", "check_loss", "one_hot", "loss_value", "output_gradient", "error_rate"]

LOSSES = ("mse", "ce")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
    return loss


def one_hot(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    return nnf.one_hot(y.long(), num_classes).to(dtype)


def per_sample_loss(outputs: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``l_i`` for every sample; ``outputs`` may carry leading batch dimensions ``(..., N, C)``."""
    if loss == "mse":
        target = one_hot(y, outputs.shape[-1], outputs.dtype)
        return 0.5 * ((outputs - target) ** 2).sum(-1)
    if loss == "ce":
        logp = torch.log_softmax(outputs, dim=-1)
        idx = y.long().expand(outputs.shape[:-1]).unsqueeze(-1)
        return -torch.gather(logp, -1, idx).squeeze(-1)
    raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")


def loss_value(outputs: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Dataset loss ``L = (1/N) sum_i l_i`` (METHOD.md §1); reduces the last two dims ``(N, C)``."""
    return per_sample_loss(outputs, y, loss).mean(-1)


def output_gradient(outputs: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``G = dl_i/df_i`` per sample, same shape as ``outputs`` (METHOD.md §2)."""
    target = one_hot(y, outputs.shape[-1], outputs.dtype)
    if loss == "mse":
        return outputs - target
    if loss == "ce":
        return torch.softmax(outputs, dim=-1) - target
    raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")


def error_rate(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of samples misclassified by arg-max; reduces the last two dims ``(N, C)``."""
    return (outputs.argmax(-1) != y.long()).to(outputs.dtype if outputs.is_floating_point() else torch.float32).mean(-1)
