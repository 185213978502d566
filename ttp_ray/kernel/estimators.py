"""Estimators of the empirical NTK and its eigendecomposition, and the :class:`~ttp_ray.state.KernelState`
built from them (METHOD.md §2 for the exact kernel, §6 for the kernel sketch).

* :func:`exact_kernel` -- every per-sample, per-class Jacobian row (C one-hot cotangents per sample,
  one batched backward), Gram accumulated over panels of samples so that the ``NC x D`` Jacobian is
  never held whole beyond the memory cap. The reference; ``eigh`` of an ``NC x NC`` matrix.
* :func:`kernel_sketch` / :func:`kernel_sketches` -- ``Z`` with ``E[Z Z^T] = Theta`` (``NC x k``) or
  ``Theta_N`` (``N x k``), streamed over the set in batches sized to ``memory_cap_mb``. Per-sample
  gradients (:mod:`ttp_ray.kernel.gradients`) are projected per parameter tensor
  (:mod:`ttp_ray.kernel.projections`), a few samples at a time while they sit in cache; no ``D x k``
  matrix is formed.

  Class-trace sketches cost ``class_probes`` cotangents per sample instead of C: the probes ``U``
  (``m x C``, shared by all samples) satisfy ``E[U^T U] = I / C`` (m random Rademacher rows / sqrt(mC);
  ``m = C`` uses ``I / sqrt(C)``, exact), so ``E[Z_N Z_N^T] = (1/C) sum_c J_c J_c^T = Theta_N``. With
  ``m < C`` the cross-class terms ``s_c s_c' J_c . J_c'`` cancel over probe draws, not over k.
* :func:`class_trace_kernel` -- the ``N x N`` class trace of a full kernel.

Eigenpairs (:func:`eigendecompose_sketch`) come from the thin SVD of Z (``lambda = sigma^2``), computed by
default through the smaller of ``Z^T Z`` / ``Z Z^T`` (never the ``NC x NC`` kernel when ``k < NC``), formed in
float64 and diagonalised in float32 (``KernelOptions.eigh_dtype``);
eigenvalues ``<= eig_rtol * lambda_max`` are dropped (:func:`eigendecompose_kernel` for the exact path).
Modes outside the kept eigenvectors do not move under the linearised dynamics: the residual there stays
constant (``||Y - F0||^2 - sum_k p_k``). Z has rank ``<= min(N, k)``: for ``N > k`` the modes beyond k
are frozen; raise k (eigen cost O(N k^2)) or predict from a subset (METHOD.md §7).

:func:`compute_kernel_state` runs the estimate chosen by :class:`~ttp_ray.kernel.options.KernelOptions`
and its eigen step; :func:`ttp_ray.kernel.cache.kernel_state` adds the disk cache. Measured cost and
accuracy of each estimate: docs/BENCHMARKS.md, section "Kernel".
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..progress import Progress, resolve
from ..state import KernelState
from .gradients import ImageSource, PerSampleGradients, auto_batch_size, class_probe_cotangents
from .options import EIGEN_SOLVERS, PROJECTIONS, KernelOptions
from .projections import PROJECTION_CLASSES, input_side_projection

__all__ = [
    "ExactKernel",
    "KernelSketch",
    "exact_kernel",
    "exact_kernel_panel",
    "exact_kernel_passes",
    "kernel_sketch",
    "kernel_sketches",
    "class_trace_kernel",
    "eigendecompose_sketch",
    "eigendecompose_kernel",
    "gram_matrix",
    "compute_kernel_state",
    "kernel_memory",
]

_CHUNK_BYTES = 4 * 2**20  # per-sample gradients are assembled and projected in blocks of about this size


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
    reduced: Tuple[str, ...] = ()  # weights sketched from delta (R a)^T (outer_width), in parameter order


def exact_kernel(grads: PerSampleGradients, images: Any, num_classes: int, *, class_trace: bool = False,
                 dtype: torch.dtype = torch.float64, memory_cap_mb: float = 512.0,
                 batch_size: Optional[int] = None, on_rows: Optional[Callable[[int], None]] = None) -> ExactKernel:
    """Exact empirical NTK from every per-sample, per-class Jacobian row (METHOD.md §2, §6).

    ``Theta[i*C + c, j*C + c'] = J_{ic} . J_{jc'}``; with ``class_trace``,
    ``Theta_N[i, j] = (1/C) sum_c J_{ic} . J_{jc}``. The Gram is accumulated in ``dtype`` over panels of
    samples whose Jacobian rows fit in half of ``memory_cap_mb`` (one panel when all of J fits; else the
    rows of the later samples are recomputed once per panel). ``images``: an ``(N, ...)`` tensor or a
    dataset with ``images(slice)`` and ``len``. Runs on ``grads.device``. ``on_rows(b)`` is called after each
    batch of b samples' Jacobian rows (:func:`exact_kernel_passes` samples in all), for progress.
    """
    src = ImageSource(images)
    n, c, d = src.n, int(num_classes), grads.num_params
    eye = torch.eye(c, dtype=grads.dtype, device=grads.device)
    if batch_size is None:
        batch_size = auto_batch_size(grads, src, c, memory_cap_mb / 2)
    item = torch.empty((), dtype=dtype).element_size()
    panel = exact_kernel_panel(n, c, d, item, memory_cap_mb, batch_size)
    per = 1 if class_trace else c
    theta = torch.zeros(n * per, n * per, dtype=dtype, device=grads.device)
    f0 = torch.empty(n, c, dtype=grads.dtype, device=grads.device)

    def jacobian_rows(s: int, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        out, g = grads(src.batch(s, e).to(device=grads.device, dtype=grads.dtype), eye)
        if on_rows is not None:
            on_rows(e - s)
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


def exact_kernel_panel(n: int, num_classes: int, num_params: int, item: int, memory_cap_mb: float,
                       batch_size: int) -> int:
    """Samples per panel of :func:`exact_kernel`: their Jacobian rows fit in half of ``memory_cap_mb``."""
    panel = max(1, min(n, int((memory_cap_mb / 2) * 2**20 // (num_classes * num_params * item))))
    return max(panel, min(n, batch_size))


def exact_kernel_passes(n: int, panel: int) -> int:
    """Sample gradients :func:`exact_kernel` computes with panels of ``panel``: each panel's own, then the later ones."""
    return sum(n - p0 for p0 in range(0, n, panel))


def kernel_sketch(grads: PerSampleGradients, images: Any, num_classes: int, *, k: int,
                  projection: str = "countsketch", class_trace: bool = False, class_probes: int = 1,
                  seed: int = 0, memory_cap_mb: float = 512.0, batch_size: Optional[int] = None,
                  outer_width: int = 0, on_rows: Optional[Callable[[int], None]] = None) -> KernelSketch:
    """Projected per-sample gradients ``Z`` with ``E[Z Z^T] = Theta`` (METHOD.md §6).

    Full (``class_trace=False``): row ``i*C + c`` of Z is ``P(J_{ic})`` (C cotangents per sample, batched).
    Class trace: row i is ``P([u_1 . J_i, ..., u_m . J_i])`` with the :func:`class_probe_cotangents`
    ``U`` (m = ``class_probes`` per sample), so ``E[Z Z^T] = Theta_N``. ``P`` is ``projection`` applied per
    parameter tensor as soon as its gradients exist; no ``D x k`` matrix is formed. ``outer_width > 0``:
    single-position weights with more inputs are projected on their input side first
    (``KernelOptions.outer_width``). Batches are sized to ``memory_cap_mb`` unless ``batch_size`` is given.
    Runs on ``grads.device``. ``on_rows(b)`` is called after each batch of b samples, for progress.
    """
    return kernel_sketches(grads, images, num_classes, [(projection, k)], class_trace=class_trace,
                           class_probes=class_probes, seed=seed, memory_cap_mb=memory_cap_mb,
                           batch_size=batch_size, outer_width=outer_width, on_rows=on_rows)[0]


def kernel_sketches(grads: PerSampleGradients, images: Any, num_classes: int, projections: Sequence[Tuple[str, int]],
                    *, class_trace: bool = False, class_probes: int = 1, seed: int = 0,
                    memory_cap_mb: float = 512.0, batch_size: Optional[int] = None, outer_width: int = 0,
                    on_rows: Optional[Callable[[int], None]] = None) -> List[KernelSketch]:
    """:func:`kernel_sketch` for several ``(projection, k)`` at once, from one gradient pass (studies of
    accuracy against k). Each sketch's ``seconds`` is the wall time of the whole shared pass."""
    for kind, _ in projections:
        if kind not in PROJECTION_CLASSES:
            raise ValueError(f"projection: {kind!r} is not one of {', '.join(PROJECTIONS)}")
    src = ImageSource(images)
    n, c = src.n, int(num_classes)
    reduce = _input_side_reductions(grads, src, int(outer_width), seed)  # set-up on one sample, like the batch size
    sizes = [grads.shapes[t][0] * int(reduce[name].shape[0]) if name in reduce else grads.sizes[t]
             for t, name in enumerate(grads.names)]
    if class_trace:
        cot = class_probe_cotangents(c, int(class_probes), seed, grads.dtype).to(grads.device)
        lengths = [cot.shape[0] * size for size in sizes]  # a sample's m probe gradients, per tensor
        per = 1
    else:
        cot = torch.eye(c, dtype=grads.dtype, device=grads.device)
        lengths = sizes
        per = c
    projs = [PROJECTION_CLASSES[kind](lengths, int(k), seed, grads.dtype, grads.device) for kind, k in projections]
    item = torch.empty((), dtype=grads.dtype).element_size()
    if batch_size is None:
        extra = per * sum(p.workspace_columns() + p.width for p in projs) * item
        batch_size = auto_batch_size(grads, src, cot.shape[0], memory_cap_mb, extra)
    chunk = max(1, _CHUNK_BYTES // (per * max(lengths) * item))  # samples whose largest gradient block fits in cache
    t0 = time.perf_counter()
    zs = [torch.empty(n * per, p.width, dtype=grads.dtype, device=grads.device) for p in projs]
    f0 = torch.empty(n, c, dtype=grads.dtype, device=grads.device)
    for s, e, x in src.batches(batch_size, grads.device, grads.dtype):
        out, block = grads.compute(x, cot, reduce)
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
        if on_rows is not None:
            on_rows(e - s)
    seconds = time.perf_counter() - t0
    reduced = tuple(name for name in grads.names if name in reduce)
    return [KernelSketch(z, f0, bool(class_trace), kind, seconds, int(batch_size), cot.cpu(), reduced)
            for z, (kind, _) in zip(zs, projections)]


def _input_side_reductions(grads: PerSampleGradients, src: ImageSource, width: int, seed: int
                           ) -> Dict[str, torch.Tensor]:
    """``{weight: R}`` for the single-position weights with more than ``width`` inputs (KernelOptions.outer_width)."""
    if width <= 0:
        return {}
    x1 = src.batch(0, 1).to(device=grads.device, dtype=grads.dtype)
    out = {}
    for name in grads.outer_products(x1):
        t = grads.names.index(name)
        fan_in = grads.sizes[t] // grads.shapes[t][0]
        if fan_in > width:
            out[name] = input_side_projection(fan_in, width, seed, t, grads.dtype, grads.device)
    return out


def class_trace_kernel(theta: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Theta_N = (1/C) tr_c Theta``: the ``N x N`` class trace of a full ``NC x NC`` kernel (state.py)."""
    c = int(num_classes)
    n = theta.shape[0] // c
    return theta.reshape(n, c, n, c).diagonal(dim1=1, dim2=3).mean(-1)


# ---------------------------------------------------------------------------------------- eigen

def kernel_memory(n: int, num_classes: int, options: KernelOptions) -> int:
    """Bytes the kernel estimate holds at its peak for ``n`` samples of ``num_classes`` classes (an upper estimate
    from what it allocates, for refusing a plan before it runs): the sketch Z (``rows x k``) and its float64 copy,
    the smaller Gram matrix and the eigenvectors (``rows x min(rows, k)``), or the exact ``rows x rows`` kernel and
    its eigh; plus the per-batch working set ``memory_cap_mb``. ``rows`` is N (class trace) or N C."""
    rows = int(n) if options.class_trace else int(n) * int(num_classes)
    cap = int(options.memory_cap_mb * 2 ** 20)
    if options.method == "exact":
        return 3 * rows * rows * 8 + cap
    k = int(options.k)
    r = min(rows, k)
    return rows * k * (4 + 8) + 2 * r * r * 8 + rows * r * 8 + cap


def eigendecompose_sketch(z: torch.Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 1e-9,
                          solver: str = "gram", eigh_dtype: Optional[torch.dtype] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``Z Z^T`` from the thin SVD ``Z = U S V^T``: ``lambda = S^2`` descending, vectors ``U``
    (METHOD.md §6); eigenvalues ``<= rtol * lambda_max`` are dropped. Cost O(rows k min(rows, k)).

    ``solver="gram"`` (default) computes that thin SVD through the smaller Gram matrix: ``Z^T Z = V S^2 V^T``
    (``k x k`` eigh) and ``U = Z V / S`` when rows >= k, else ``Z Z^T = U S^2 U^T`` (rows < k, the
    smaller side; its lower triangle only, by row blocks); two to three times faster than LAPACK's SVD
    here, and in float64 its round-off
    (~1e-16 lambda_max) is far below the dropping threshold. The Gram matrix is formed in ``dtype``, its
    ``eigh`` runs in ``eigh_dtype`` (default: ``dtype``; again in ``dtype`` if it fails to converge there)
    and the pairs are returned in ``dtype``. With a
    lower-precision eigh and rows >= k, the eigenvalues ``<= 10 eps(eigh_dtype) lambda_max`` are dropped as
    well: ``U = Z V / S`` would amplify their round-off (rows < k: U is eigh's own orthonormal output, and
    round-off-sized eigenvalues are modes that barely move). ``solver="svd"`` uses ``torch.linalg.svd`` (prefer it with
    ``dtype=float32``; ``eigh_dtype`` does not apply).
    """
    if solver not in EIGEN_SOLVERS:
        raise ValueError(f"solver: {solver!r} is not one of {', '.join(EIGEN_SOLVERS)}")
    zd = z.to(dtype)
    rows, k = zd.shape
    floor = rtol
    if solver == "svd":
        u, sv, _ = torch.linalg.svd(zd, full_matrices=False)
        lam = sv * sv
    else:
        low = eigh_dtype if eigh_dtype is not None else dtype
        if rows >= k and torch.finfo(low).eps > torch.finfo(dtype).eps:  # U = Z V / S is only as good as S
            floor = max(rtol, 10 * torch.finfo(low).eps)
        gram = gram_matrix(zd.T.contiguous() if rows >= k else zd)
        try:
            lam, vec = torch.linalg.eigh(gram.to(low))
        except torch.linalg.LinAlgError:  # LAPACK's float32 eigh can fail to converge on clustered spectra
            low, floor = dtype, rtol
            lam, vec = torch.linalg.eigh(gram)
        lam, vec = lam.flip(0).to(dtype), vec.flip(1).to(dtype)
        u = None if rows >= k else vec
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return lam[:0].contiguous(), zd.new_zeros(rows, 0)
    keep = lam > floor * lam[0]
    lam = lam[keep].contiguous()
    if u is None:  # U = Z V S^-1, the left singular vectors of the kept modes
        u = (zd @ vec[:, keep]) * torch.rsqrt(lam)
    else:
        u = u[:, keep]
    return lam, u.contiguous()


def gram_matrix(a: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``a a^T``, the lower triangle by row blocks and mirrored: about half the work of one ``a @ a.T`` (and
    measured 2x faster on the CPU, docs/BENCHMARKS.md, section "Kernel"), exactly symmetric."""
    n = a.shape[0]
    g = torch.empty(n, n, dtype=a.dtype, device=a.device)
    for i in range(0, n, block):
        rows = a[i:i + block] @ a[:i + block].T  # block i against blocks 0..i
        g[i:i + block, :i + block] = rows
        g[:i, i:i + block] = rows[:, :i].T
    return g


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
                         device: Union[str, torch.device] = "cpu", trainable: str = "all",
                         progress: Optional[Progress] = None) -> KernelState:
    """The :class:`KernelState` of ``model`` (eval mode, BN frozen) on ``dataset``, computed now.

    ``dataset``: an :class:`~ttp_ray.data.ImageDataset` (``images``, ``targets``, ``num_classes``,
    ``len``). f0 are the outputs at w0 (eval mode, batched: a by-product of the gradient pass);
    eigenpairs come from the SVD of Z (``method="sketch"``) or ``eigh`` of Theta (``"exact"``).
    ``device``: where gradients, Z and the eigen step run ("cpu", "cuda", ...); the state returned is on
    the CPU. ``trainable``: ``"all"`` or ``"head"`` (models.trainable_names). ``progress``: one task over the
    samples' gradient pass, with an ETA (default: the ambient one, :func:`ttp_ray.progress.current`).
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
    what = f"kernel of {meta['dataset'] or 'the dataset'} ({len(dataset)} samples, {options.method}"
    if options.method == "exact":
        b = options.batch_size or auto_batch_size(grads, ImageSource(dataset), c, options.memory_cap_mb / 2)
        item = torch.empty((), dtype=dt).element_size()
        passes = exact_kernel_passes(len(dataset), exact_kernel_panel(len(dataset), c, grads.num_params, item,
                                                                      options.memory_cap_mb, b))
        with resolve(progress).task(f"{what}): per-sample Jacobians", total=passes, unit="samples") as task:
            ex = exact_kernel(grads, dataset, c, class_trace=options.class_trace, dtype=dt,
                              memory_cap_mb=options.memory_cap_mb, batch_size=b, on_rows=task.advance)
        t1 = time.perf_counter()
        eigvals, eigvecs = eigendecompose_kernel(ex.theta, dtype=dt, rtol=options.eig_rtol)
        eig_s = time.perf_counter() - t1
        f0, sketch = ex.f0, None
        meta.update(projection=None, k=None, seed=None, class_probes=None, kernel_seconds=ex.seconds,
                    batch_size=ex.batch_size, panels=ex.panels)
    else:
        with resolve(progress).task(f"{what} k={options.k}): per-sample gradients, sketched", total=len(dataset),
                                    unit="samples") as task:
            sk = kernel_sketch(grads, dataset, c, k=options.k, projection=options.projection,
                               class_trace=options.class_trace, class_probes=options.class_probes,
                               seed=options.seed, memory_cap_mb=options.memory_cap_mb,
                               batch_size=options.batch_size, outer_width=options.outer_width,
                               on_rows=task.advance)
        t1 = time.perf_counter()
        eigvals, eigvecs = eigendecompose_sketch(sk.z, dtype=dt, rtol=options.eig_rtol, solver=options.eigen_solver,
                                                 eigh_dtype=getattr(torch, options.eigh_dtype))
        eig_s = time.perf_counter() - t1
        f0, sketch = sk.f0, sk.z
        meta.update(projection=options.projection, k=int(options.k), sketch_width=int(sk.z.shape[1]),
                    input_side_reduced=list(sk.reduced),
                    seed=int(options.seed), kernel_seconds=sk.seconds, batch_size=sk.batch_size,
                    class_probes=int(options.class_probes) if options.class_trace else None)
    meta.update(eigen_seconds=eig_s, rank=int(eigvals.numel()), total_seconds=time.perf_counter() - t_start)
    if grads.fallback_reason:  # engine auto: running the model showed hooks cannot do it; vmap did
        meta.update(engine=grads.engine, engine_fallback=grads.fallback_reason)
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
