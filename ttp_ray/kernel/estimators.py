"""The empirical NTK of a fine-tuning model on a target set: exact reference, projected sketch, their
eigendecomposition, the :class:`~ttp_ray.state.KernelState` built from them, and its disk cache
(METHOD.md §2, §6).

Conventions are those of :mod:`ttp_ray.state`: ``Theta = J J^T`` with ``J`` the ``NC x D`` Jacobian of
the outputs at ``w0`` (row ``i*C + c`` = sample i, class c), eigenvalues of ``Theta`` itself (not / N);
the class-trace kernel is ``Theta_N = (1/C) sum_c J_c J_c^T`` (``N x N``), ``Theta ~ Theta_N (x) I_C``.

Per-sample gradients
--------------------
:class:`PerSampleGradients` gives ``u . df(x_i)/dw`` for cotangents ``u`` shared by all samples, by one
of two engines with the same numbers: ``hooks`` (one batched forward and backward, per-sample weight
gradients assembled from each layer's input and output gradient: Linear, Conv2d, eval-mode BatchNorm;
about 2-3x faster on CPU) or ``vmap`` (``torch.func.vjp`` per sample under ``vmap``, any model).
``engine="auto"`` takes hooks when every trainable parameter allows it and records the choice in meta.

Estimators
----------
* :func:`exact_kernel` -- every per-sample, per-class Jacobian row (C one-hot cotangents per sample,
  one batched backward), Gram accumulated over panels of samples so that the ``NC x D`` Jacobian is
  never held whole beyond the memory cap. The reference; ``eigh`` of an ``NC x NC`` matrix.
* :func:`kernel_sketch` -- ``Z`` with ``E[Z Z^T] = Theta`` (``NC x k``) or ``Theta_N`` (``N x k``),
  streamed over the set in batches sized to ``memory_cap_mb``. Per-sample gradients are projected per
  parameter tensor, a few samples at a time while they sit in cache; no ``D x k`` matrix is formed.
  Projections (:data:`PROJECTIONS`):

  - ``countsketch``: each coordinate of each parameter tensor hashed to one of k buckets with a
    random sign (unit scale: ``E[Z Z^T] = J J^T``); O(D) state, O(rows * D) work whatever k;
  - ``subset``: k coordinates drawn without replacement, split over the parameter tensors in
    proportion to their size, each rescaled by ``sqrt(d_t / k_t)``; ``k >= D`` gives J itself;
  - ``gaussian``: dense N(0, 1/k) projection regenerated from the seed in ``k x chunk`` blocks on every
    batch (O(rows * D * k) work: the textbook reference, slow).

  Class-trace sketches cost ``class_probes`` cotangents per sample instead of C: the probes ``U``
  (``m x C``, shared by all samples) satisfy ``E[U^T U] = I / C`` (m random Rademacher rows / sqrt(mC);
  ``m = C`` uses ``I / sqrt(C)``, exact), so ``E[Z_N Z_N^T] = (1/C) sum_c J_c J_c^T = Theta_N``. With
  ``m < C`` the cross-class terms ``s_c s_c' J_c . J_c'`` cancel over probe draws, not over k.

Eigenpairs (:func:`eigendecompose_sketch`) come from the thin SVD of Z (``lambda = sigma^2``), computed by
default through the smaller of ``Z^T Z`` / ``Z Z^T`` (never the ``NC x NC`` kernel when ``k < NC``);
eigenvalues ``<= eig_rtol * lambda_max`` are dropped. Modes outside the kept eigenvectors do not move
under the linearised dynamics: the residual there stays constant (``||Y - F0||^2 - sum_k p_k``).

Default (:class:`KernelOptions`), chosen by measurement
-------------------------------------------------------
``method="sketch", projection="countsketch", k=2048, class_trace=True, class_probes=1`` (engine auto).
Figures from ``bench/kernel.py`` (docs/BENCHMARKS.md, section "kernel"): ``digits-5to9`` (N = 896, C = 5),
digits-cnn (D = 23.6k) and digits-resnet (D = 77.5k), trainable all, one CPU thread.

* Cost decides for the class trace. A one-probe class-trace sketch needs one backward per sample, the
  full kernel C. Kernel time / one epoch of forward+backward at batch 128 (full batch in brackets), range
  over three bench runs: default 1.2-1.7 (1.7-2.1) on digits-cnn and 2.5-2.8 (3.9-4.2) on digits-resnet;
  full-kernel count sketch 4.6-6.2 and 11.2-11.5; class trace with C probes 3.8-6.3 and 10.6-11.3; exact
  kernel 240-680. Only the one-probe class trace meets the "<= 3 epochs" target (against a full-batch
  epoch digits-resnet is at 4: its 77k per-sample gradients per image outweigh its 8x8 convolutions).
  The eigen step adds 0.26-0.38 s at N = 896 (O(N k min(N, k)) whatever the model: 2-4 epochs of these
  tiny nets, negligible for real ones).
* Accuracy, judged by the T_eps of the predicted MSE curve against the exact full kernel (discrete GD,
  lr = half the maximal stable one, 500 steps, relative eps 0.01 / 0.05, mean of 2 seeds): default
  1.4% / 5.1% (cnn) and 2.3% / 11.2% (resnet); full-kernel count sketch at k = 2048: 1.1% / 5.9% and
  2.7% / 7.8%; the exact class-trace kernel itself: 1.9% / 11.3% and 6.0% / 15.5%. The class-trace
  approximation, not the sketch, sets the error; it is largest on digits-resnet (32% off the full kernel
  in Frobenius norm, loss curve up to 38% off). When T_eps accuracy matters more than cost and NC is
  small, pass ``class_trace=False`` with ``k >= 2048`` (Z has rank <= k < NC: on digits-resnet k = 1024
  gives 18% at eps 0.05, the curve is 21% off at k = 2048).
* Count sketch over the others: coordinate subsets are worse at every k (Frobenius error 1.1-1.3x on the
  class trace, 6-12x on the full kernel, whose sketched spectra exceed the stability limit on
  digits-resnet: the gradient energy sits in few coordinates), for a 10-40% saving in time; the
  Gaussian projection matches the count sketch at O(N D k) work.
* k = 2048: class-trace errors stop improving beyond k ~ 1024-2048 (probe and class trace dominate).
  Z has rank <= min(N, k): for N > k the modes beyond k are frozen; raise k (eigen cost O(N k^2)) or
  predict from a subset (METHOD.md §7).
* One probe: C probes (the exact class trace in expectation) cost C times more and did not improve T_eps
  on these nets (4 seeds, eps 0.05: cnn 10.8% vs 6.8%, resnet 17.7% vs 17.5%).

Cache
-----
:func:`kernel_state` keys the state by a content hash of the model (its state dict, weights and buffers,
head included), the dataset fingerprint (which covers a subset), ``trainable`` and every option that
changes the result, and stores it at ``$TTP_RAY_CACHE/kernels/<key>.pt`` (plain tensors and a JSON
string, written atomically, read with ``torch.load(weights_only=True)``). The file holds its key and a
SHA-256 of its payload; a file that cannot be read, fails its checksum or holds another key is
recomputed and rewritten (with a warning), never trusted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as nnf
from torch import nn

from ..atomic import atomic_write
from ..state import KernelState

__all__ = [
    "METHODS",
    "PROJECTIONS",
    "DTYPES",
    "EIGEN_SOLVERS",
    "KERNEL_CACHE_VERSION",
    "ENGINES",
    "KernelOptions",
    "PerSampleGradients",
    "ExactKernel",
    "KernelSketch",
    "class_probe_cotangents",
    "exact_kernel",
    "kernel_sketch",
    "kernel_sketches",
    "class_trace_kernel",
    "eigendecompose_kernel",
    "eigendecompose_sketch",
    "compute_kernel_state",
    "kernel_state",
    "kernel_cache_key",
    "kernel_cache_path",
    "kernels_cache_dir",
    "save_kernel_state",
    "load_kernel_state",
    "KernelCacheError",
]

METHODS = ("sketch", "exact")
ENGINES = ("auto", "hooks", "vmap")
PROJECTIONS = ("countsketch", "subset", "gaussian")
DTYPES = ("float32", "float64")
EIGEN_SOLVERS = ("gram", "svd")
KERNEL_CACHE_VERSION = 1
_FILE_FORMAT = "ttp-ray-kernel-state"
_CHUNK_BYTES = 4 * 2**20  # per-sample gradients are assembled and projected in blocks of about this size

Params = Dict[str, torch.Tensor]
ApplyFn = Callable[[Params, torch.Tensor], torch.Tensor]
GradientBlocks = Callable[[str, int, int], torch.Tensor]


# ------------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class KernelOptions:
    """How Theta is estimated (METHOD.md §6); every default stated here.

    * ``method``: ``"sketch"`` (projected per-sample gradients, the default) or ``"exact"``;
    * ``projection``: one of :data:`PROJECTIONS` (sketch only);
    * ``k``: sketch width (columns of Z);
    * ``class_trace``: estimate ``Theta_N`` (``N x N``, Theta ~ Theta_N (x) I_C) instead of the full
      ``NC x NC`` Theta;
    * ``class_probes``: vjps per sample for a class-trace sketch, 1..C (C: exact class trace in
      expectation over the projection; fewer: also random over the class probes). Ignored otherwise;
    * ``seed``: seeds the projection and the class probes;
    * ``memory_cap_mb``: bound on the per-batch working set (per-sample gradients, activations,
      projection temporaries; for ``exact`` also the held Jacobian panel). Z itself (``rows x k``) and
      the exact Theta are outputs and not counted;
    * ``batch_size``: samples per batch; ``None`` derives it from ``memory_cap_mb``;
    * ``dtype``: dtype of the eigen step (SVD of Z / eigh of Theta) and of the exact Gram accumulation;
    * ``eig_rtol``: eigenvalues ``<= eig_rtol * lambda_max`` are dropped (numerically zero); the exact
      path's eigh additionally uses at least ``10 * eps(dtype)``;
    * ``eigen_solver``: how the thin SVD of Z is computed (:func:`eigendecompose_sketch`), ``"gram"``
      or ``"svd"``;
    * ``engine``: per-sample gradient engine (:class:`PerSampleGradients`): ``"auto"`` (hooks when the
      model's trainable layers allow it, else vmap; recorded in meta), ``"hooks"`` or ``"vmap"``. Same
      numbers either way, so not part of the cache key.
    """

    method: str = "sketch"
    projection: str = "countsketch"
    k: int = 2048
    class_trace: bool = True
    class_probes: int = 1
    seed: int = 0
    memory_cap_mb: float = 512.0
    batch_size: Optional[int] = None
    dtype: str = "float64"
    eig_rtol: float = 1e-9
    eigen_solver: str = "gram"
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection: {self.projection!r} is not one of {', '.join(PROJECTIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if int(self.k) < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if int(self.class_probes) < 1:
            raise ValueError(f"class_probes: must be >= 1, got {self.class_probes}")
        if not self.memory_cap_mb > 0:
            raise ValueError(f"memory_cap_mb: must be > 0, got {self.memory_cap_mb}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1 or None, got {self.batch_size}")
        if self.eigen_solver not in EIGEN_SOLVERS:
            raise ValueError(f"eigen_solver: {self.eigen_solver!r} is not one of {', '.join(EIGEN_SOLVERS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not 0 <= self.eig_rtol < 1:
            raise ValueError(f"eig_rtol: must be in [0, 1), got {self.eig_rtol}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def result_fields(self) -> Dict[str, Any]:
        """The options that change the result (cache key); batch size and memory cap do not."""
        out = {"method": self.method, "class_trace": bool(self.class_trace), "dtype": self.dtype,
               "eig_rtol": float(self.eig_rtol)}
        if self.method == "sketch":
            out.update(projection=self.projection, k=int(self.k), seed=int(self.seed),
                       eigen_solver=self.eigen_solver)
            if self.class_trace:
                out["class_probes"] = int(self.class_probes)
        return out


# ------------------------------------------------------------------------------- shared machinery

def _sub_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed derived from ``seed`` and tags, identical on every platform and run."""
    h = hashlib.sha256(repr((int(seed),) + tuple(tags)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _cpu_generator(seed: int, *tags: Any) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_sub_seed(seed, *tags))


class _Images:
    """Uniform batch access to a tensor of images or a dataset with ``images(slice)`` and ``len``."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.n = int(source.shape[0]) if isinstance(source, torch.Tensor) else len(source)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source[start:stop]
        return self.source.images(slice(start, stop))

    def batches(self, batch_size: int, device, dtype) -> Iterator[Tuple[int, int, torch.Tensor]]:
        for start in range(0, self.n, batch_size):
            stop = min(self.n, start + batch_size)
            yield start, stop, self.batch(start, stop).to(device=device, dtype=dtype)


class PerSampleGradients:
    """Per-sample output gradients ``u . df(x_i)/dw`` for a set of cotangents ``u`` shared by all samples.

    Calling it on a batch ``x`` with cotangents ``U`` (``m x C``) returns the outputs ``(b, C)`` at w0 and
    ``{name: (b, m, *shape)}``. Two engines compute the same numbers (METHOD.md §6):

    * ``vmap`` (:meth:`from_functional`): ``torch.func.vjp`` per sample, vmapped over the batch and over
      the m cotangents; any functional model;
    * ``hooks`` (:meth:`from_module`): one batched forward, m batched backward passes to the outputs of
      the layers owning trainable parameters, then per-sample weight gradients assembled from each
      layer's input and output gradient (``Linear``, ``Conv2d`` with ``groups=1``, eval-mode
      ``BatchNorm1d/2d``). Faster on CPU (no per-sample graph); requires every trainable parameter to
      belong to such a layer, each called once per forward.
    """

    def __init__(self, engine: str, params: Params, fn: Callable, act_fn: Callable) -> None:
        if not params:
            raise ValueError("params: no trainable parameters")
        self.engine = engine
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [int(params[n].numel()) for n in self.names]
        first = params[self.names[0]]
        if not first.is_floating_point():
            raise ValueError(f"params: {self.names[0]} is not floating point")
        self.dtype, self.device = first.dtype, first.device
        self._fn, self._act_fn = fn, act_fn

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def compute(self, x: torch.Tensor, cotangents: torch.Tensor) -> Tuple[torch.Tensor, GradientBlocks]:
        """Outputs ``(b, C)`` and ``block(name, lo, hi) -> (hi - lo, m, *shape)``: the per-sample gradients
        of parameter ``name`` for samples ``lo:hi`` of the batch (computed lazily by the hooks engine)."""
        return self._fn(x, cotangents)

    def __call__(self, x: torch.Tensor, cotangents: torch.Tensor) -> Tuple[torch.Tensor, Params]:
        """Outputs ``(b, C)`` and every per-sample gradient ``{name: (b, m, *shape)}``."""
        out, block = self._fn(x, cotangents)
        return out, {n: block(n, 0, x.shape[0]) for n in self.names}

    def saved_activation_bytes(self, x1: torch.Tensor) -> int:
        """Bytes autograd saves for one sample's backward (parameters themselves not counted)."""
        return self._act_fn(x1)

    @classmethod
    def from_functional(cls, apply: ApplyFn, params: Params) -> "PerSampleGradients":
        """The ``vmap`` engine on a pure ``apply(params, x) -> (B, C)`` (models.functional_model)."""
        params = {n: t.detach() for n, t in params.items()}

        def fn(x: torch.Tensor, cotangents: torch.Tensor):
            out, g = _vmap_output_vjps(apply, params, x, cotangents)
            return out, lambda name, lo, hi: g[name][lo:hi]

        def act(x1: torch.Tensor) -> int:
            with torch.enable_grad():
                p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
                return _saved_bytes(lambda: apply(p, x1), list(params.values()) + list(p.values()))

        return cls("vmap", params, fn, act)

    @classmethod
    def from_module(cls, model: nn.Module, trainable: str = "all", engine: str = "auto") -> "PerSampleGradients":
        """The ``hooks`` engine on ``model`` when it supports it (``engine="auto"`` or ``"hooks"``), else
        (``"auto"`` only) the ``vmap`` engine on ``models.functional_model(model, trainable)``."""
        from ..models import functional_model, trainable_names

        if engine not in ENGINES:
            raise ValueError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
        names = trainable_names(model, trainable)
        layers, why = _hookable_layers(model, names)
        if engine == "hooks" and layers is None:
            raise ValueError(f"engine hooks: {why}; use engine='vmap'")
        if engine == "vmap" or layers is None:
            params, apply = functional_model(model, trainable)
            return cls.from_functional(apply, params)
        params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}

        def fn(x: torch.Tensor, cotangents: torch.Tensor):
            return _hook_output_vjps(model, layers, x, cotangents)

        def act(x1: torch.Tensor) -> int:
            with torch.enable_grad():
                xx = x1.detach().clone().requires_grad_(True)
                return _saved_bytes(lambda: model(xx), list(model.parameters()))

        return cls("hooks", params, fn, act)


def _saved_bytes(forward: Callable[[], Any], exclude: Sequence[torch.Tensor]) -> int:
    own = {t.data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def _vmap_output_vjps(apply: ApplyFn, params: Params, x: torch.Tensor, cotangents: torch.Tensor
                      ) -> Tuple[torch.Tensor, Params]:
    """Outputs ``(b, C)`` and per-sample vjps ``{name: (b, m, *shape)}`` for the ``(m, C)`` cotangents:
    one forward per sample and one vmapped backward over the m cotangents, vmapped over the batch."""

    def one_sample(p: Params, xi: torch.Tensor):
        out, pullback = torch.func.vjp(lambda q: apply(q, xi.unsqueeze(0)).squeeze(0), p)
        if cotangents.shape[0] == 1:
            (g,) = pullback(cotangents[0])
            return out, {n: t.unsqueeze(0) for n, t in g.items()}
        (g,) = torch.func.vmap(pullback)(cotangents)
        return out, g

    return torch.func.vmap(one_sample, in_dims=(None, 0))(params, x)


_HOOKABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _hookable_layers(model: nn.Module, names: Sequence[str]):
    """``{module name: (module, [(param name, attr)])}`` for the hooks engine, or ``(None, reason)``."""
    modules = dict(model.named_modules())
    layers: Dict[str, Tuple[nn.Module, List[Tuple[str, str]]]] = {}
    for pname in names:
        mname, _, attr = pname.rpartition(".")
        mod = modules.get(mname)
        if not isinstance(mod, _HOOKABLE) or attr not in ("weight", "bias"):
            return None, f"parameter {pname} belongs to {type(mod).__name__}, not one of Linear, Conv2d, BatchNorm"
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"
                                           or isinstance(mod.padding, str)):
            return None, f"{mname}: Conv2d with groups, padding mode or string padding is not supported"
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and (mod.running_mean is None or mod.training):
            return None, f"{mname}: BatchNorm must use running statistics (eval mode)"
        layers.setdefault(mname, (mod, []))[1].append((pname, attr))
    return layers, ""


def _hook_output_vjps(model: nn.Module, layers, x: torch.Tensor, cotangents: torch.Tensor
                      ) -> Tuple[torch.Tensor, GradientBlocks]:
    """The hooks engine: batched forward capturing each layer's input and output, m batched backward
    passes to those outputs; per-sample parameter gradients are assembled on demand, per layer type, for
    a range of samples (so that a caller can project them chunk by chunk while they sit in cache)."""
    inputs: Dict[str, torch.Tensor] = {}
    versions: Dict[str, int] = {}
    outputs: Dict[str, torch.Tensor] = {}
    calls: Dict[str, int] = {}

    def hook(name):
        def fwd(mod, inp, out):
            calls[name] = calls.get(name, 0) + 1
            inputs[name], versions[name], outputs[name] = inp[0].detach(), inp[0]._version, out
            return out.clone()  # later in-place ops (ReLU(inplace=True)) must not touch the captured output
        return fwd

    handles = [mod.register_forward_hook(hook(name)) for name, (mod, _) in layers.items()]
    try:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            out = model(xx)
    finally:
        for h in handles:
            h.remove()
    reused = [n for n, k in calls.items() if k != 1]
    if reused or len(calls) != len(layers):
        raise RuntimeError(f"engine hooks: layers called more or less than once per forward "
                           f"({', '.join(reused) or 'some never'}); use engine='vmap'")
    changed = [n for n in layers if inputs[n]._version != versions[n]]
    if changed:
        raise RuntimeError(f"engine hooks: the input of {', '.join(changed)} is modified in place after the layer "
                           f"ran; use engine='vmap'")
    order = list(layers)
    m, b = cotangents.shape[0], x.shape[0]
    targets = [outputs[n] for n in order]
    if m == 1:
        deltas = torch.autograd.grad(out, targets, cotangents[0].expand(b, -1), allow_unused=True)
        deltas = [None if d is None else d.unsqueeze(0) for d in deltas]
    else:
        u = cotangents[:, None, :].expand(m, b, cotangents.shape[1])
        deltas = torch.autograd.grad(out, targets, u, is_grads_batched=True, allow_unused=True)
    # a layer whose output does not reach the outputs has zero gradient
    deltas = [t.new_zeros((m,) + tuple(t.shape)) if d is None else d for d, t in zip(deltas, targets)]
    del targets
    owner = {pname: (name, attr) for name, (_, plist) in layers.items() for pname, attr in plist}
    delta_of = dict(zip(order, deltas))  # (m, b, *out_shape) per layer
    del outputs

    def block(pname: str, lo: int, hi: int) -> torch.Tensor:
        name, attr = owner[pname]
        return _layer_param_grad(layers[name][0], attr, inputs[name][lo:hi], delta_of[name][:, lo:hi])

    return out.detach(), block


def _unfold(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``F.unfold`` for ``conv`` as one strided copy (F.unfold loops over the batch on CPU)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    xp = nnf.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    b, c, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((b, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3))
    return view.reshape(b, c * kh * kw, ho * wo)


def _layer_param_grad(mod: nn.Module, attr: str, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient ``(b, m, *param_shape)`` of one parameter from the layer input ``a`` (b, ...)
    and the output gradients ``delta`` (m, b, ...): ``sum_p delta_p a_p^T`` over positions p."""
    m, b = delta.shape[0], delta.shape[1]
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        if isinstance(mod, nn.Linear):  # positions = any extra dims between batch and features
            d = delta.reshape(m, b, -1, delta.shape[-1]).permute(1, 0, 3, 2)  # (b, m, out, P)
        else:
            d = delta.reshape(m, b, delta.shape[2], -1).transpose(0, 1)  # (b, m, Cout, P)
        if attr == "bias":
            return d.sum(3)
        if isinstance(mod, nn.Linear):
            cols = a.reshape(b, -1, a.shape[-1]).transpose(1, 2)  # (b, in, P)
        else:
            cols = _unfold(a, mod)  # (b, Cin*kh*kw, P)
        dm = d.reshape(b, m * d.shape[2], d.shape[3])
        if d.shape[3] == 1:  # one position: a broadcast outer product beats a batched matmul
            g = dm * cols.transpose(1, 2)
        else:
            g = torch.bmm(dm, cols.transpose(1, 2))  # (b, m*out, in)
        return g.reshape(b, m, *mod.weight.shape)
    # BatchNorm in eval mode: y = xhat * gamma + beta, xhat from the running statistics
    d = delta.reshape(m, b, delta.shape[2], -1).transpose(0, 1)  # (b, m, C, P)
    if attr == "bias":
        return d.sum(3)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var.reshape(shape) + mod.eps)
    return (d * xhat.reshape(b, 1, xhat.shape[1], -1)).sum(3)


def _auto_batch_size(grads: "PerSampleGradients", images: "_Images", probes: int, memory_cap_mb: float,
                     extra_bytes_per_sample: int = 0) -> int:
    """Samples per batch so that gradients, activations and temporaries fit in ``memory_cap_mb``.

    Per sample: ``probes`` gradient copies of all D parameters, twice (the engine's output and the
    projection temporaries), plus the activations saved for backward, ``2 + probes`` times (forward,
    captured outputs, the m output gradients), plus ``extra_bytes_per_sample``. An estimate, recorded in
    the state's meta.
    """
    item = torch.empty((), dtype=grads.dtype).element_size()
    x1 = images.batch(0, 1).to(device=grads.device, dtype=grads.dtype)
    act = grads.saved_activation_bytes(x1)
    per_sample = 2 * probes * grads.num_params * item + (2 + probes) * act + int(extra_bytes_per_sample)
    return max(1, min(images.n, int(memory_cap_mb * 2**20 // max(per_sample, 1))))


def class_probe_cotangents(num_classes: int, probes: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``U`` (``probes x C``) with ``E[U^T U] = I / C``, shared by every sample (class-trace sketch).

    ``probes == C``: ``I / sqrt(C)`` (``U^T U = I / C`` exactly); fewer: Rademacher rows / sqrt(probes*C).
    """
    c = int(num_classes)
    if not 1 <= probes <= c:
        raise ValueError(f"class_probes: must be in 1..{c} for {c} classes, got {probes}")
    if probes == c:
        return torch.eye(c, dtype=dtype) / math.sqrt(c)
    g = _cpu_generator(seed, "class-probes", c, probes)
    signs = torch.randint(0, 2, (probes, c), generator=g).to(dtype) * 2 - 1
    return signs / math.sqrt(probes * c)


# ------------------------------------------------------------------------------------- projections

class _Projection:
    """Maps each parameter tensor's flattened gradient rows ``(rows, L_t)`` into the sketch's columns.

    Use: ``ws = begin(rows)``, ``accumulate(t, g, ws)`` for every tensor t, ``finish(ws) -> (rows, width)``.
    """

    kind = ""

    def __init__(self, lengths: Sequence[int], k: int, seed: int, dtype: torch.dtype, device) -> None:
        self.lengths, self.k, self.seed, self.dtype, self.device = list(lengths), int(k), int(seed), dtype, device

    @property
    def width(self) -> int:
        return self.k

    def workspace_columns(self) -> int:
        return self.width

    def begin(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.workspace_columns(), dtype=self.dtype, device=self.device)

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def finish(self, ws: torch.Tensor) -> torch.Tensor:
        return ws


class _CountSketch(_Projection):
    """Coordinate j of tensor t goes to bucket ``h_t(j)`` with sign ``s_t(j)``: ``E[Z Z^T] = J J^T``.

    The sign is folded into the bucket index (``h + k [s < 0]`` into a ``2k``-wide workspace, then
    ``Z = W[:, :k] - W[:, k:]``): one ``index_add_`` per tensor and no signed copy of the gradients.
    """

    kind = "countsketch"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.index = []
        for t, length in enumerate(self.lengths):
            g = _cpu_generator(self.seed, "countsketch", t, length, self.k)
            bucket = torch.randint(0, self.k, (length,), generator=g)
            negative = torch.randint(0, 2, (length,), generator=g)
            self.index.append((bucket + self.k * negative).to(self.device))

    def workspace_columns(self) -> int:
        return 2 * self.k

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        ws.index_add_(1, self.index[t], g)

    def finish(self, ws: torch.Tensor) -> torch.Tensor:
        return ws[:, :self.k] - ws[:, self.k:]


class _CoordinateSubset(_Projection):
    """k_t coordinates of tensor t (k_t proportional to its size), rescaled by ``sqrt(L_t / k_t)``."""

    kind = "subset"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.alloc = _proportional_allocation(self.lengths, self.k)
        self.index, self.scale, self.offset = [], [], []
        off = 0
        for t, (length, kt) in enumerate(zip(self.lengths, self.alloc)):
            g = _cpu_generator(self.seed, "subset", t, length, self.k)
            idx = torch.sort(torch.randperm(length, generator=g)[:kt]).values
            self.index.append(idx.to(self.device))
            self.scale.append(math.sqrt(length / kt))
            self.offset.append(off)
            off += kt
        self._width = off

    @property
    def width(self) -> int:
        return self._width

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        off, kt = self.offset[t], self.alloc[t]
        ws[:, off:off + kt] = g.index_select(1, self.index[t]) * self.scale[t]


class _GaussianBlocks(_Projection):
    """Dense N(0, 1/k) projection, regenerated from the seed in ``k x chunk`` blocks on every batch
    (a device generator: the numbers differ between CPU and CUDA, the distribution does not)."""

    kind = "gaussian"
    chunk_bytes = 32 * 2**20

    def accumulate(self, t: int, g: torch.Tensor, ws: torch.Tensor) -> None:
        length = self.lengths[t]
        item = torch.empty((), dtype=self.dtype).element_size()
        chunk = max(1, min(length, self.chunk_bytes // (self.k * item)))
        for j, start in enumerate(range(0, length, chunk)):
            stop = min(length, start + chunk)
            gen = torch.Generator(device=self.device).manual_seed(_sub_seed(self.seed, "gaussian", t, j, chunk))
            block = torch.randn(self.k, stop - start, generator=gen, device=self.device, dtype=self.dtype)
            ws.addmm_(g[:, start:stop], block.T, alpha=1.0 / math.sqrt(self.k))


def _proportional_allocation(lengths: Sequence[int], k: int) -> List[int]:
    """Split k over tensors in proportion to their lengths (largest remainder), each in 1..L_t."""
    total = sum(lengths)
    if k >= total:
        return list(lengths)
    k = max(k, len(lengths))
    raw = [k * length / total for length in lengths]
    alloc = [min(length, max(1, int(math.floor(r)))) for r, length in zip(raw, lengths)]
    order = sorted(range(len(lengths)), key=lambda t: raw[t] - math.floor(raw[t]), reverse=True)
    i = 0
    while sum(alloc) < k and i < 10 * len(lengths) + k:
        t = order[i % len(order)]
        if alloc[t] < lengths[t]:
            alloc[t] += 1
        i += 1
    while sum(alloc) > k:  # the max(1, .) floor can overshoot when there are many tiny tensors
        t = max(range(len(alloc)), key=lambda j: alloc[j])
        alloc[t] -= 1
    return alloc


_PROJECTION_CLASSES = {cls.kind: cls for cls in (_CountSketch, _CoordinateSubset, _GaussianBlocks)}


# ------------------------------------------------------------------------------------ estimators

@dataclass
class ExactKernel:
    """The exact kernel (``NC x NC``, or ``N x N`` class trace), the outputs at w0, and how it ran."""

    theta: torch.Tensor
    f0: torch.Tensor
    class_trace: bool
    seconds: float
    batch_size: int
    panels: int


@dataclass
class KernelSketch:
    """Z with ``E[Z Z^T] = Theta`` (``NC x k``) or ``Theta_N`` (``N x k``), outputs at w0, and timings."""

    z: torch.Tensor
    f0: torch.Tensor
    class_trace: bool
    projection: str
    seconds: float
    batch_size: int
    cotangents: torch.Tensor


def exact_kernel(grads: PerSampleGradients, images: Any, num_classes: int, *, class_trace: bool = False,
                 dtype: torch.dtype = torch.float64, memory_cap_mb: float = 512.0,
                 batch_size: Optional[int] = None) -> ExactKernel:
    """Exact empirical NTK from every per-sample, per-class Jacobian row (METHOD.md §2, §6).

    ``Theta[i*C + c, j*C + c'] = J_{ic} . J_{jc'}``; with ``class_trace``,
    ``Theta_N[i, j] = (1/C) sum_c J_{ic} . J_{jc}``. The Gram is accumulated in ``dtype`` over panels of
    samples whose Jacobian rows fit in half of ``memory_cap_mb`` (one panel when all of J fits; else the
    rows of the later samples are recomputed once per panel). ``images``: an ``(N, ...)`` tensor or a
    dataset with ``images(slice)`` and ``len``. Runs on ``grads.device``.
    """
    src = _Images(images)
    n, c, d = src.n, int(num_classes), grads.num_params
    eye = torch.eye(c, dtype=grads.dtype, device=grads.device)
    if batch_size is None:
        batch_size = _auto_batch_size(grads, src, c, memory_cap_mb / 2)
    item = torch.empty((), dtype=dtype).element_size()
    panel = max(1, min(n, int((memory_cap_mb / 2) * 2**20 // (c * d * item))))
    panel = max(panel, min(n, batch_size))
    per = 1 if class_trace else c
    theta = torch.zeros(n * per, n * per, dtype=dtype, device=grads.device)
    f0 = torch.empty(n, c, dtype=grads.dtype, device=grads.device)

    def jacobian_rows(s: int, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        out, g = grads(src.batch(s, e).to(device=grads.device, dtype=grads.dtype), eye)
        flat = torch.cat([g[nm].reshape(e - s, c, -1) for nm in grads.names], dim=2).to(dtype)
        if class_trace:  # (b, C*D) / sqrt(C): its Gram is (1/C) sum_c J_c J_c^T
            return out, flat.reshape(e - s, c * d) / math.sqrt(c)
        return out, flat.reshape((e - s) * c, d)

    t0 = time.perf_counter()
    panels = 0
    for p0 in range(0, n, panel):
        p1 = min(n, p0 + panel)
        panels += 1
        held = []
        for s in range(p0, p1, batch_size):
            e = min(p1, s + batch_size)
            out, rows = jacobian_rows(s, e)
            f0[s:e] = out
            held.append(rows)
        jp = torch.cat(held)
        del held
        theta[p0 * per:p1 * per, p0 * per:p1 * per] = jp @ jp.T
        for s in range(p1, n, batch_size):  # later samples, recomputed once per panel
            e = min(n, s + batch_size)
            blk = jp @ jacobian_rows(s, e)[1].T
            theta[p0 * per:p1 * per, s * per:e * per] = blk
            theta[s * per:e * per, p0 * per:p1 * per] = blk.T
        del jp
    seconds = time.perf_counter() - t0
    return ExactKernel(theta, f0, bool(class_trace), seconds, int(batch_size), panels)


def kernel_sketch(grads: PerSampleGradients, images: Any, num_classes: int, *, k: int,
                  projection: str = "countsketch", class_trace: bool = False, class_probes: int = 1,
                  seed: int = 0, memory_cap_mb: float = 512.0, batch_size: Optional[int] = None) -> KernelSketch:
    """Projected per-sample gradients ``Z`` with ``E[Z Z^T] = Theta`` (METHOD.md §6).

    Full (``class_trace=False``): row ``i*C + c`` of Z is ``P(J_{ic})`` (C cotangents per sample, batched).
    Class trace: row i is ``P([u_1 . J_i, ..., u_m . J_i])`` with the :func:`class_probe_cotangents`
    ``U`` (m = ``class_probes`` per sample), so ``E[Z Z^T] = Theta_N``. ``P`` is ``projection`` applied per
    parameter tensor as soon as its gradients exist; no ``D x k`` matrix is formed. Batches are sized to
    ``memory_cap_mb`` unless ``batch_size`` is given. Runs on ``grads.device``.
    """
    return kernel_sketches(grads, images, num_classes, [(projection, k)], class_trace=class_trace,
                           class_probes=class_probes, seed=seed, memory_cap_mb=memory_cap_mb,
                           batch_size=batch_size)[0]


def kernel_sketches(grads: PerSampleGradients, images: Any, num_classes: int, projections: Sequence[Tuple[str, int]],
                    *, class_trace: bool = False, class_probes: int = 1, seed: int = 0,
                    memory_cap_mb: float = 512.0, batch_size: Optional[int] = None) -> List[KernelSketch]:
    """:func:`kernel_sketch` for several ``(projection, k)`` at once, from one gradient pass (studies of
    accuracy against k). Each sketch's ``seconds`` is the wall time of the whole shared pass."""
    for kind, _ in projections:
        if kind not in _PROJECTION_CLASSES:
            raise ValueError(f"projection: {kind!r} is not one of {', '.join(PROJECTIONS)}")
    src = _Images(images)
    n, c = src.n, int(num_classes)
    if class_trace:
        cot = class_probe_cotangents(c, int(class_probes), seed, grads.dtype).to(grads.device)
        lengths = [cot.shape[0] * size for size in grads.sizes]  # a sample's m probe gradients, per tensor
        per = 1
    else:
        cot = torch.eye(c, dtype=grads.dtype, device=grads.device)
        lengths = list(grads.sizes)
        per = c
    projs = [_PROJECTION_CLASSES[kind](lengths, int(k), seed, grads.dtype, grads.device) for kind, k in projections]
    item = torch.empty((), dtype=grads.dtype).element_size()
    if batch_size is None:
        extra = per * sum(p.workspace_columns() + p.width for p in projs) * item
        batch_size = _auto_batch_size(grads, src, cot.shape[0], memory_cap_mb, extra)
    chunk = max(1, _CHUNK_BYTES // (per * max(lengths) * item))  # samples whose largest gradient block fits in cache
    t0 = time.perf_counter()
    zs = [torch.empty(n * per, p.width, dtype=grads.dtype, device=grads.device) for p in projs]
    f0 = torch.empty(n, c, dtype=grads.dtype, device=grads.device)
    for s, e, x in src.batches(batch_size, grads.device, grads.dtype):
        out, block = grads.compute(x, cot)
        f0[s:e] = out
        wss = [p.begin((e - s) * per) for p in projs]
        for lo in range(0, e - s, chunk):
            hi = min(e - s, lo + chunk)
            for t, name in enumerate(grads.names):
                g = block(name, lo, hi).reshape((hi - lo) * per, lengths[t])
                for p, ws in zip(projs, wss):
                    p.accumulate(t, g, ws[lo * per:hi * per])
        for p, ws, z in zip(projs, wss, zs):
            z[s * per:e * per] = p.finish(ws)
        del out, block, wss
    seconds = time.perf_counter() - t0
    return [KernelSketch(z, f0, bool(class_trace), kind, seconds, int(batch_size), cot.cpu())
            for z, (kind, _) in zip(zs, projections)]


def class_trace_kernel(theta: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Theta_N = (1/C) tr_c Theta``: the ``N x N`` class trace of a full ``NC x NC`` kernel (state.py)."""
    c = int(num_classes)
    n = theta.shape[0] // c
    return theta.reshape(n, c, n, c).diagonal(dim1=1, dim2=3).mean(-1)


# ---------------------------------------------------------------------------------------- eigen

def eigendecompose_sketch(z: torch.Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 1e-9,
                          solver: str = "gram") -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``Z Z^T`` from the thin SVD ``Z = U S V^T``: ``lambda = S^2`` descending, vectors ``U``
    (METHOD.md §6); eigenvalues ``<= rtol * lambda_max`` are dropped. Cost O(rows k min(rows, k)).

    ``solver="gram"`` (default) computes that thin SVD through the smaller Gram matrix: ``Z^T Z = V S^2 V^T``
    (``k x k`` eigh) and ``U = Z V / S`` when rows >= k, else ``Z Z^T = U S^2 U^T`` (rows < k, the
    smaller side); two to three times faster than LAPACK's SVD here, and in float64 its round-off
    (~1e-16 lambda_max) is far below the dropping threshold. ``solver="svd"`` uses
    ``torch.linalg.svd`` (prefer it with ``dtype=float32``).
    """
    if solver not in EIGEN_SOLVERS:
        raise ValueError(f"solver: {solver!r} is not one of {', '.join(EIGEN_SOLVERS)}")
    zd = z.to(dtype)
    rows, k = zd.shape
    if solver == "svd":
        u, sv, _ = torch.linalg.svd(zd, full_matrices=False)
        lam = sv * sv
    elif rows >= k:
        lam, v = torch.linalg.eigh(zd.T @ zd)
        lam, v = lam.flip(0), v.flip(1)
        u = None
    else:
        lam, u = torch.linalg.eigh(zd @ zd.T)
        lam, u = lam.flip(0), u.flip(1)
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return lam[:0].contiguous(), zd.new_zeros(rows, 0)
    keep = lam > rtol * lam[0]
    lam = lam[keep].contiguous()
    if u is None:  # U = Z V S^-1, the left singular vectors of the kept modes
        u = (zd @ v[:, keep]) * torch.rsqrt(lam)
    else:
        u = u[:, keep]
    return lam, u.contiguous()


def eigendecompose_kernel(theta: torch.Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 1e-9
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD kernel matrix by ``eigh`` (the exact path), descending; eigenvalues
    ``<= max(rtol, 10 eps(dtype)) * lambda_max`` dropped (round-off, including small negatives)."""
    lam, vec = torch.linalg.eigh(theta.to(dtype))
    lam, vec = lam.flip(0), vec.flip(1)
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return lam[:0].contiguous(), vec[:, :0].contiguous()
    keep = lam > max(rtol, 10 * torch.finfo(dtype).eps) * lam[0]
    return lam[keep].contiguous(), vec[:, keep].contiguous()


# --------------------------------------------------------------------------------- KernelState

def _model_on(model: nn.Module, device) -> nn.Module:
    dev = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device == dev or (dev.type == t.device.type and dev.index is None) for t in tensors):
        return model
    return copy.deepcopy(model).to(dev)


def compute_kernel_state(model: nn.Module, dataset: Any, options: KernelOptions = KernelOptions(), *,
                         device: Union[str, torch.device] = "cpu", trainable: str = "all") -> KernelState:
    """The :class:`KernelState` of ``model`` (eval mode, BN frozen) on ``dataset``, computed now.

    ``dataset``: an :class:`~ttp_ray.data.ImageDataset` (``images``, ``targets``, ``num_classes``,
    ``len``). f0 are the outputs at w0 (eval mode, batched: a by-product of the gradient pass);
    eigenpairs come from the SVD of Z (``method="sketch"``) or ``eigh`` of Theta (``"exact"``).
    ``device``: where gradients, Z and the eigen step run ("cpu", "cuda", ...); the state returned is on
    the CPU. ``trainable``: ``"all"`` or ``"head"`` (models.trainable_names).
    """
    if model.training:
        raise ValueError("model: must be in eval mode (batch-norm statistics frozen, METHOD.md §1); call model.eval()")
    t_start = time.perf_counter()
    net = _model_on(model, device)
    grads = PerSampleGradients.from_module(net, trainable, options.engine)
    c = int(dataset.num_classes)
    dt = options.torch_dtype
    meta: Dict[str, Any] = {
        "kind": options.method, "class_trace": bool(options.class_trace), "dtype": options.dtype,
        "eig_rtol": float(options.eig_rtol), "n": len(dataset), "num_classes": c, "num_params": grads.num_params,
        "trainable": trainable, "device": str(torch.device(device)), "engine": grads.engine,
        "memory_cap_mb": float(options.memory_cap_mb), "torch": torch.__version__,
        "dataset": getattr(dataset, "name", None), "options": asdict(options),
    }
    if options.method == "exact":
        ex = exact_kernel(grads, dataset, c, class_trace=options.class_trace, dtype=dt,
                          memory_cap_mb=options.memory_cap_mb, batch_size=options.batch_size)
        t1 = time.perf_counter()
        eigvals, eigvecs = eigendecompose_kernel(ex.theta, dtype=dt, rtol=options.eig_rtol)
        eig_s = time.perf_counter() - t1
        f0, sketch = ex.f0, None
        meta.update(projection=None, k=None, seed=None, class_probes=None, kernel_seconds=ex.seconds,
                    batch_size=ex.batch_size, panels=ex.panels)
    else:
        sk = kernel_sketch(grads, dataset, c, k=options.k, projection=options.projection,
                           class_trace=options.class_trace, class_probes=options.class_probes, seed=options.seed,
                           memory_cap_mb=options.memory_cap_mb, batch_size=options.batch_size)
        t1 = time.perf_counter()
        eigvals, eigvecs = eigendecompose_sketch(sk.z, dtype=dt, rtol=options.eig_rtol, solver=options.eigen_solver)
        eig_s = time.perf_counter() - t1
        f0, sketch = sk.f0, sk.z
        meta.update(projection=options.projection, k=int(options.k), sketch_width=int(sk.z.shape[1]),
                    seed=int(options.seed), kernel_seconds=sk.seconds, batch_size=sk.batch_size,
                    class_probes=int(options.class_probes) if options.class_trace else None)
    meta.update(eigen_seconds=eig_s, rank=int(eigvals.numel()), total_seconds=time.perf_counter() - t_start)
    return KernelState(
        f0=f0.detach().cpu(),
        targets=torch.as_tensor(dataset.targets).long().cpu().clone(),
        num_classes=c,
        eigvals=eigvals.cpu(),
        eigvecs=eigvecs.cpu(),
        class_trace=bool(options.class_trace),
        sketch=None if sketch is None else sketch.detach().cpu(),
        meta=meta,
    )


# -------------------------------------------------------------------------------------- the cache

class KernelCacheError(ValueError):
    """A cache file cannot be trusted: unreadable, truncated, tampered with, or holding another key."""


def kernels_cache_dir() -> Path:
    """``$TTP_RAY_CACHE/kernels`` (root from :func:`ttp_ray.models.cache_dir`)."""
    from ..models import cache_dir

    return Path(cache_dir()) / "kernels"


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kernel_cache_key(model: nn.Module, dataset: Any, options: KernelOptions, *, trainable: str = "all"
                     ) -> Tuple[str, Dict[str, Any]]:
    """Content hash (and the fields hashed) of everything that changes the state: model weights and
    buffers (head included, so the head seed too), dataset fingerprint (which covers a subset), size and
    classes, ``trainable`` and :meth:`KernelOptions.result_fields`."""
    fields_ = {
        "version": KERNEL_CACHE_VERSION,
        "model": _model_fingerprint(model),
        "head_seed": getattr(model, "head_seed", None),
        "dataset": str(dataset.fingerprint()),
        "n": len(dataset),
        "num_classes": int(dataset.num_classes),
        "trainable": trainable,
        "options": options.result_fields(),
    }
    blob = json.dumps(fields_, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:40], fields_


def kernel_cache_path(key: str, root: Optional[Union[str, Path]] = None) -> Path:
    return Path(root) / f"{key}.pt" if root is not None else kernels_cache_dir() / f"{key}.pt"


def _payload(state: KernelState) -> Dict[str, Any]:
    meta = {k: v for k, v in state.meta.items() if k != "cache"}
    return {
        "f0": state.f0.contiguous(),
        "targets": state.targets.contiguous(),
        "eigvals": state.eigvals.contiguous(),
        "eigvecs": state.eigvecs.contiguous(),
        "sketch": None if state.sketch is None else state.sketch.contiguous(),
        "num_classes": int(state.num_classes),
        "class_trace": bool(state.class_trace),
        "meta_json": json.dumps(meta, sort_keys=True, default=str),
    }


def _checksum(payload: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(payload):
        v = payload[name]
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def save_kernel_state(state: KernelState, path: Union[str, Path], key: str) -> Path:
    """Write ``state`` with its key and payload checksum, atomically (temp file + ``os.replace``)."""
    payload = _payload(state)
    blob = {"format": _FILE_FORMAT, "version": KERNEL_CACHE_VERSION, "key": key, "checksum": _checksum(payload),
            "payload": payload}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_kernel_state(path: Union[str, Path], key: str) -> KernelState:
    """Read a cached state, verifying format, key and checksum; raises :class:`KernelCacheError`."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file
        raise KernelCacheError(f"{path.name}: unreadable ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FILE_FORMAT or not isinstance(blob.get("payload"), dict):
        raise KernelCacheError(f"{path.name}: not a ttp-ray kernel state file")
    if blob.get("version") != KERNEL_CACHE_VERSION:
        raise KernelCacheError(f"{path.name}: cache version {blob.get('version')} != {KERNEL_CACHE_VERSION}")
    if blob.get("key") != key:
        raise KernelCacheError(f"{path.name}: holds key {blob.get('key')!r}, expected {key!r}")
    payload = blob["payload"]
    try:
        if _checksum(payload) != blob.get("checksum"):
            raise KernelCacheError(f"{path.name}: payload checksum mismatch")
        return KernelState(
            f0=payload["f0"], targets=payload["targets"], num_classes=int(payload["num_classes"]),
            eigvals=payload["eigvals"], eigvecs=payload["eigvecs"], class_trace=bool(payload["class_trace"]),
            sketch=payload["sketch"], meta=json.loads(payload["meta_json"]),
        )
    except KernelCacheError:
        raise
    except Exception as exc:
        raise KernelCacheError(f"{path.name}: malformed payload ({type(exc).__name__})") from None


def kernel_state(model: nn.Module, dataset: Any, options: KernelOptions = KernelOptions(), *,
                 device: Union[str, torch.device] = "cpu", trainable: str = "all", cache: bool = True,
                 cache_root: Optional[Union[str, Path]] = None) -> KernelState:
    """The cached :class:`KernelState` if a valid one exists, else :func:`compute_kernel_state` (stored).

    ``meta["cache"]`` records ``hit``, ``path``, ``load_seconds`` and, on a miss, ``reason``
    (``absent``, ``disabled`` or the :class:`KernelCacheError` message: a corrupt or mismatched file is
    recomputed and overwritten, with a warning) and ``stored`` (False, with a warning, when the file
    cannot be written). ``cache_root`` defaults to :func:`kernels_cache_dir`.
    """
    if not cache:
        state = compute_kernel_state(model, dataset, options, device=device, trainable=trainable)
        state.meta["cache"] = {"hit": False, "reason": "disabled", "path": None}
        return state
    key, key_fields = kernel_cache_key(model, dataset, options, trainable=trainable)
    path = kernel_cache_path(key, cache_root)
    reason = "absent"
    if path.exists():
        t0 = time.perf_counter()
        try:
            state = load_kernel_state(path, key)
            state.meta["cache"] = {"hit": True, "path": str(path), "key": key,
                                   "load_seconds": time.perf_counter() - t0}
            return state
        except KernelCacheError as exc:
            reason = str(exc)
            warnings.warn(f"kernel cache: {reason}; recomputing", RuntimeWarning, stacklevel=2)
    state = compute_kernel_state(model, dataset, options, device=device, trainable=trainable)
    state.meta["cache_key"] = key
    state.meta["cache_key_fields"] = key_fields
    stored = True
    try:
        save_kernel_state(state, path, key)
    except OSError as exc:  # e.g. a read-only cache: the state is still right, say so and go on
        stored = False
        warnings.warn(f"kernel cache: cannot write {path} ({exc}); state not cached", RuntimeWarning, stacklevel=2)
    state.meta["cache"] = {"hit": False, "reason": reason, "path": str(path), "key": key, "stored": stored}
    return state
