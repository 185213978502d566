"""Per-sample output gradients at ``w0``: the rows of the Jacobian ``J`` that every kernel estimate is
built from (METHOD.md §6, the kernel sketch; §2 for the exact kernel).

:class:`PerSampleGradients` gives ``u . df(x_i)/dw`` for cotangents ``u`` shared by all samples, by one
of two engines with the same numbers: ``hooks`` (one batched forward and backward, per-sample weight
gradients assembled from each layer's input and output gradient: Linear, Conv2d, eval-mode BatchNorm;
faster on CPU, see docs/BENCHMARKS.md, section "Kernel", the ``engine vmap`` rows) or ``vmap``
(``torch.func.vjp`` per sample under ``vmap``, any model). ``engine="auto"`` takes hooks when every
trainable parameter allows it, and turns to vmap if running the model shows it cannot (a layer called twice
per forward, or its input modified in place afterwards: :class:`HooksUnsupported`).

Also here: :class:`ImageSource` (batches of a tensor of images or of a dataset), :func:`auto_batch_size`
(samples per batch within a memory cap) and :func:`class_probe_cotangents` (the class probes ``U`` of a
class-trace sketch).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

from .options import ENGINES
from .seeds import cpu_generator

__all__ = [
    "Params",
    "ApplyFn",
    "GradientBlocks",
    "ImageSource",
    "PerSampleGradients",
    "HooksUnsupported",
    "auto_batch_size",
    "class_probe_cotangents",
]

Params = Dict[str, torch.Tensor]
ApplyFn = Callable[[Params, torch.Tensor], torch.Tensor]
GradientBlocks = Callable[[str, int, int], torch.Tensor]


class ImageSource:
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


class HooksUnsupported(RuntimeError):
    """The hooks engine cannot give this model's per-sample gradients, which only running it shows: a layer
    called more or less than once per forward, or a layer's input modified in place after the layer ran."""


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

    def __init__(self, engine: str, params: Params, fn: Callable, act_fn: Callable,
                 positions_fn: Optional[Callable[[torch.Tensor], Dict[str, int]]] = None) -> None:
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
        self._fn, self._act_fn, self._positions_fn = fn, act_fn, positions_fn
        # engine "auto" on hooks: the vmap engine to turn to if running the model raises HooksUnsupported
        self._fallback: Optional[Callable[[], "PerSampleGradients"]] = None
        self.fallback_reason: Optional[str] = None  # why it turned to vmap, if it did

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def compute(self, x: torch.Tensor, cotangents: torch.Tensor, reduce: Optional[Params] = None
                ) -> Tuple[torch.Tensor, GradientBlocks]:
        """Outputs ``(b, C)`` and ``block(name, lo, hi) -> (hi - lo, m, *shape)``: the per-sample gradients
        of parameter ``name`` for samples ``lo:hi`` of the batch (computed lazily by the hooks engine).

        ``reduce``: ``{name: R}`` with ``R`` (``w x fan_in``) for weights of at least two dimensions; their
        blocks are ``G R^T`` instead, ``(hi - lo, m, shape[0], w)`` (G: the gradient with its input dimensions
        flattened). The hooks engine projects the layer inputs first and never forms G (METHOD.md §6).

        Built with ``engine="auto"`` on hooks, a model that the hooks engine turns out not to support (running it
        raised :class:`HooksUnsupported`) is computed by the vmap engine from then on (``engine`` says so and
        ``fallback_reason`` says why)."""
        try:
            return self._fn(x, cotangents, reduce or {})
        except HooksUnsupported as exc:
            if self._fallback is None:
                raise
            other, self._fallback = self._fallback(), None
            self.engine, self._fn, self._act_fn = other.engine, other._fn, other._act_fn
            self.fallback_reason = str(exc)
            return self._fn(x, cotangents, reduce or {})

    def outer_products(self, x1: torch.Tensor) -> List[str]:
        """Names of the weights whose per-sample gradient is a single outer product ``delta a^T`` for inputs
        shaped like ``x1`` (one sample): ``Linear`` and ``Conv2d`` weights with one output position. Empty
        when built :meth:`from_functional` (no layers to inspect)."""
        if self._positions_fn is None:
            return []
        positions = self._positions_fn(x1)
        return [n for n in self.names if positions.get(n) == 1]

    def __call__(self, x: torch.Tensor, cotangents: torch.Tensor) -> Tuple[torch.Tensor, Params]:
        """Outputs ``(b, C)`` and every per-sample gradient ``{name: (b, m, *shape)}``."""
        out, block = self.compute(x, cotangents)
        return out, {n: block(n, 0, x.shape[0]) for n in self.names}

    def saved_activation_bytes(self, x1: torch.Tensor) -> int:
        """Bytes autograd saves for one sample's backward (parameters themselves not counted)."""
        return self._act_fn(x1)

    @classmethod
    def from_functional(cls, apply: ApplyFn, params: Params) -> "PerSampleGradients":
        """The ``vmap`` engine on a pure ``apply(params, x) -> (B, C)`` (models.functional_model)."""
        params = {n: t.detach() for n, t in params.items()}

        def fn(x: torch.Tensor, cotangents: torch.Tensor, reduce: Params):
            out, g = _vmap_output_vjps(apply, params, x, cotangents)

            def block(name: str, lo: int, hi: int) -> torch.Tensor:
                r = reduce.get(name)
                if r is None:
                    return g[name][lo:hi]
                gb = g[name][lo:hi]
                return gb.reshape(*gb.shape[:3], -1) @ r.T  # G R^T on the flattened input dimensions

            return out, block

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
        positions = functools.partial(_weight_positions, model, names)
        layers, why = _hookable_layers(model, names)
        if engine == "hooks" and layers is None:
            raise ValueError(f"engine hooks: {why}; use engine='vmap'")

        def vmap_engine() -> "PerSampleGradients":
            params_f, apply_f = functional_model(model, trainable)
            other = cls.from_functional(apply_f, params_f)
            other._positions_fn = positions
            return other

        if engine == "vmap" or layers is None:
            return vmap_engine()
        params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}

        def fn(x: torch.Tensor, cotangents: torch.Tensor, reduce: Params):
            return _hook_output_vjps(model, layers, x, cotangents, reduce)

        def act(x1: torch.Tensor) -> int:
            with torch.enable_grad():
                xx = x1.detach().clone().requires_grad_(True)
                return _saved_bytes(lambda: model(xx), list(model.parameters()))

        grads = cls("hooks", params, fn, act, positions)
        if engine == "auto":
            grads._fallback = vmap_engine
        return grads


def _weight_positions(model: nn.Module, names: Sequence[str], x1: torch.Tensor) -> Dict[str, int]:
    """``{weight name: output positions per sample}`` of the trainable ``Linear`` / ``Conv2d`` weights, from one
    forward pass on ``x1``; a weight whose layer runs more than once gets no entry."""
    modules = dict(model.named_modules())
    owned = {}
    for pname in names:
        mname, _, attr = pname.rpartition(".")
        if attr == "weight" and isinstance(modules.get(mname), (nn.Linear, nn.Conv2d)):
            owned[mname] = pname
    seen: Dict[str, List[int]] = {}

    def hook(mname):
        def record(mod, inp, out):
            per = out[0].numel() // (mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels)
            seen.setdefault(mname, []).append(int(per))
        return record

    handles = [modules[m].register_forward_hook(hook(m)) for m in owned]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return {owned[m]: p[0] for m, p in seen.items() if len(p) == 1}


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


def _hook_output_vjps(model: nn.Module, layers, x: torch.Tensor, cotangents: torch.Tensor, reduce: Params
                      ) -> Tuple[torch.Tensor, GradientBlocks]:
    """The hooks engine: batched forward capturing each layer's input and output, m batched backward
    passes to those outputs; per-sample parameter gradients are assembled on demand, per layer type, for
    a range of samples (so that a caller can project them chunk by chunk while they sit in cache).
    ``reduce``: weights whose blocks are ``G R^T`` (:meth:`PerSampleGradients.compute`)."""
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
        raise HooksUnsupported(f"engine hooks: layers called more or less than once per forward "
                               f"({', '.join(reused) or 'some never'}); use engine='vmap'")
    changed = [n for n in layers if inputs[n]._version != versions[n]]
    if changed:
        raise HooksUnsupported(f"engine hooks: the input of {', '.join(changed)} is modified in place after the "
                               f"layer ran; use engine='vmap'")
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
        return _layer_param_grad(layers[name][0], attr, inputs[name][lo:hi], delta_of[name][:, lo:hi],
                                 reduce.get(pname))

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


def _layer_param_grad(mod: nn.Module, attr: str, a: torch.Tensor, delta: torch.Tensor,
                      reduce: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample gradient ``(b, m, *param_shape)`` of one parameter from the layer input ``a`` (b, ...)
    and the output gradients ``delta`` (m, b, ...): ``sum_p delta_p a_p^T`` over positions p. With
    ``reduce`` (R, ``w x fan_in``; weights only): ``sum_p delta_p (R a_p)^T``, ``(b, m, out, w)``, the inputs
    projected before the outer products (G itself never formed)."""
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
        if reduce is not None:  # (b, w, P): R a_p, as one matrix product over samples and positions
            cols = (cols.transpose(1, 2) @ reduce.T).transpose(1, 2)
        if d.shape[3] == 1:  # one position: a broadcast outer product beats a batched matmul
            g = dm * cols.transpose(1, 2)
        else:
            g = torch.bmm(dm, cols.transpose(1, 2))  # (b, m*out, in)
        if reduce is not None:
            return g.reshape(b, m, d.shape[2], reduce.shape[0])
        return g.reshape(b, m, *mod.weight.shape)
    # BatchNorm in eval mode: y = xhat * gamma + beta, xhat from the running statistics
    d = delta.reshape(m, b, delta.shape[2], -1).transpose(0, 1)  # (b, m, C, P)
    if attr == "bias":
        return d.sum(3)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var.reshape(shape) + mod.eps)
    return (d * xhat.reshape(b, 1, xhat.shape[1], -1)).sum(3)


def auto_batch_size(grads: "PerSampleGradients", images: "ImageSource", probes: int, memory_cap_mb: float,
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
    g = cpu_generator(seed, "class-probes", c, probes)
    signs = torch.randint(0, 2, (probes, c), generator=g).to(dtype) * 2 - 1
    return signs / math.sqrt(probes * c)
