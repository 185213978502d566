"""The empirical NTK of a fine-tuning model on a target set: exact reference, projected sketch, their
eigendecomposition, the :class:`~ttp_ray.state.KernelState` built from them, and its disk cache
(METHOD.md §2, §6).

Conventions are those of :mod:`ttp_ray.state`: ``Theta = J J^T`` with ``J`` the ``NC x D`` Jacobian of
the outputs at ``w0`` (row ``i*C + c`` = sample i, class c), eigenvalues of ``Theta`` itself (not / N);
the class-trace kernel is ``Theta_N = (1/C) sum_c J_c J_c^T`` (``N x N``), ``Theta ~ Theta_N (x) I_C``.

Modules, each importing only those listed before it:

* :mod:`~ttp_ray.kernel.options` -- :class:`KernelOptions` and the values its fields accept;
* :mod:`~ttp_ray.kernel.seeds` -- derived seeds for the random parts of a sketch;
* :mod:`~ttp_ray.kernel.gradients` -- per-sample output gradients (:class:`PerSampleGradients`, hooks
  and vmap engines), batch sizing and the class probes;
* :mod:`~ttp_ray.kernel.projections` -- the sketch projections (count sketch, coordinate subset, Gaussian);
* :mod:`~ttp_ray.kernel.estimators` -- exact kernel, sketches, class trace, eigendecomposition,
  :func:`compute_kernel_state`;
* :mod:`~ttp_ray.kernel.cache` -- the verified disk cache and :func:`kernel_state`.

This package re-exports the public API below, so ``from ttp_ray.kernel import X`` works for each of
them. Measured cost and accuracy of the estimates, and why the defaults are what they are:
docs/BENCHMARKS.md, section "Kernel".
"""
from .cache import (
    KERNEL_CACHE_VERSION,
    KernelCacheError,
    kernel_cache_key,
    kernel_cache_path,
    kernel_state,
    kernels_cache_dir,
    load_kernel_state,
    model_fingerprint,
    save_kernel_state,
)
from .estimators import (
    ExactKernel,
    KernelSketch,
    class_trace_kernel,
    compute_kernel_state,
    kernel_memory,
    eigendecompose_kernel,
    eigendecompose_sketch,
    exact_kernel,
    gram_matrix,
    kernel_sketch,
    kernel_sketches,
)
from .gradients import PerSampleGradients, class_probe_cotangents
from .options import DTYPES, EIGEN_SOLVERS, ENGINES, METHODS, PROJECTIONS, KernelOptions

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
    "gram_matrix",
    "compute_kernel_state",
    "kernel_memory",
    "kernel_state",
    "kernel_cache_key",
    "model_fingerprint",
    "kernel_cache_path",
    "kernels_cache_dir",
    "save_kernel_state",
    "load_kernel_state",
    "KernelCacheError",
]
