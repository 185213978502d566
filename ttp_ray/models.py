"""Backbones, their deterministic pre-training and cache, and the fine-tuning model (METHOD.md §1).

Backbone names understood by :func:`load_backbone`:

* ``digits-cnn``: a small conv net; ``digits-resnet``: torchvision's own ``ResNet`` built from its
  ``BasicBlock`` at reduced depth ([1, 1, 1, 1]) and width (8-16-32-64), with batch norm. Both are
  **pre-trained by this project** on ``digits-0to4`` with the recipe in :data:`PRETRAIN_RECIPE`
  (fixed seed, deterministic algorithms), cached under ``$TTP_RAY_CACHE/backbones`` and reused;
* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision ResNets with ``IMAGENET1K_V1`` weights,
  read from torch's hub cache; never downloaded unless asked (``allow_download=True``);
* ``ARCH:PATH``: a local state-dict checkpoint for one of the architectures above
  (``torch.load(weights_only=True)``);
* ``package.module:function``: a user factory returning an ``nn.Module``, called under torch's CPU generator
  seeded with :data:`FACTORY_SEED` (and restored afterwards): a factory that initialises weights at random
  (``torchvision.models:resnet18`` builds an untrained net) gives the same network in every process, so that
  the sweep's actors, its ground-truth fine-tunes and the kernel cache all see one backbone.

Every backbone declares its input (:func:`input_spec`, an :class:`~ttp_ray.inputs.InputSpec`): the digits nets
1 x 8 x 8 with values in [-1, 1] (:data:`DIGITS_INPUT`, as ``digits*`` are scaled); the torchvision ResNets what
their ``IMAGENET1K_V1`` weights' transforms say (3 x 224 x 224, ImageNet mean / std); a checkpoint or a factory
what it declares (an ``input_spec`` attribute of the module or the factory, or an ``input_spec`` entry beside
``state_dict`` in a checkpoint: an InputSpec or a mapping of its fields), else unknown but for the channels of
its first convolution. :func:`load_dataset_for_model` loads a dataset brought to that input (:mod:`ttp_ray.inputs`).

The fine-tuning model is the backbone's features followed by a **new** linear head for C classes,
seeded; batch-norm statistics stay frozen (the model is always in eval mode).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .atomic import atomic_write
from .data import ImageDataset, is_embedded, load_dataset
from .inputs import UNKNOWN_INPUT, AdaptOptions, InputSpec, check_channels
from .progress import Progress, resolve
from .paths import cache_dir  # re-exported: ttp_ray.models.cache_dir keeps working

__all__ = [
    "ModelError",
    "DigitsCNN",
    "DigitsResNet",
    "digits_cnn",
    "digits_resnet",
    "FinetuneModel",
    "PretrainRecipe",
    "PRETRAIN_RECIPE",
    "cache_dir",
    "list_models",
    "load_backbone",
    "pretrain_backbone",
    "load_pretrained_digits",
    "trainable_names",
    "TRAINABLE",
    "check_trainable",
    "build_finetune_model",
    "functional_model",
    "state_dict_hash",
    "DIGITS_INPUT",
    "input_spec",
    "module_input_spec",
    "load_dataset_for_model",
    "is_factory",
]


class ModelError(ValueError):
    """A backbone cannot be built or loaded; the message is one line naming the model."""


# ----------------------------------------------------------------------------------- architectures

class DigitsCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels) and global average pooling: 64 features."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)
        self.feature_dim = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@functools.lru_cache(maxsize=None)
def _digits_resnet_class() -> type:
    """``DigitsResNet``, defined on first use: torchvision (whose import also loads torch._dynamo, seconds) is
    imported only when a digits-resnet is built, not by every command that imports this module."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class DigitsResNet(ResNet):
        """torchvision's ResNet with BasicBlocks at reduced depth and width, for 8x8 inputs.

        Uses ``ResNet._make_layer`` and ``ResNet.forward`` unchanged; the stem is a 3x3 stride-1 conv
        without max-pooling so an 8x8 image keeps spatial extent through the four stages.
        """

        def __init__(self, in_channels: int = 1, num_classes: int = 5, widths=(8, 16, 32, 64),
                     layers=(1, 1, 1, 1)) -> None:
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()
            self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
            self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
            self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
            self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[3], num_classes)
            self.feature_dim = widths[3]
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    DigitsResNet.__qualname__ = "DigitsResNet"  # the model fingerprint (kernel and backbone caches) reads it
    return DigitsResNet


def __getattr__(name: str) -> Any:
    if name == "DigitsResNet":
        return _digits_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def digits_cnn(num_classes: int = 5) -> DigitsCNN:
    return DigitsCNN(1, num_classes)


def digits_resnet(num_classes: int = 5) -> "DigitsResNet":
    return _digits_resnet_class()(1, num_classes)


_DIGITS_ARCHS: Dict[str, Callable[[int], nn.Module]] = {"digits-cnn": digits_cnn, "digits-resnet": digits_resnet}
_TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")


# ------------------------------------------------------------------------------------- pre-training

@dataclass(frozen=True)
class PretrainRecipe:
    """How the embedded backbones are pre-trained on ``digits-0to4`` (every default stated)."""

    dataset: str = "digits-0to4"
    holdout_fraction: float = 0.2  # held out to report accuracy on unseen images of the source task
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    version: int = 2  # bump to invalidate caches when the recipe's code changes (2: single-threaded)

    def key(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


PRETRAIN_RECIPE = PretrainRecipe()


def state_dict_hash(sd: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pretrain_backbone(name: str, recipe: PretrainRecipe = PRETRAIN_RECIPE, *, progress: Optional[Progress] = None,
                      why: str = "") -> Tuple[nn.Module, Dict[str, float]]:
    """Pre-train a digits backbone from scratch, deterministically; returns (model, report). ``progress``: one
    task advanced per epoch (default: the ambient one, :func:`ttp_ray.progress.current`), described with ``why``."""
    if name not in _DIGITS_ARCHS:
        raise ModelError(f"model: only {', '.join(_DIGITS_ARCHS)} are pre-trained by ttp-ray, not {name!r}")
    ds = load_dataset(recipe.dataset)
    g = torch.Generator().manual_seed(recipe.seed)
    perm = torch.randperm(len(ds), generator=g)
    n_hold = int(round(recipe.holdout_fraction * len(ds)))
    hold, train = perm[:n_hold], perm[n_hold:]
    x, y = ds.x, ds.targets
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # one thread: CPU reductions then sum in one order, so the weights are bit-identical whatever the
    # caller's thread count (a Ray worker runs with 1, a shell with all cores)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(recipe.seed)
        model = _DIGITS_ARCHS[name](ds.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
        t0 = time.perf_counter()
        task = resolve(progress).task(f"pre-training {name} on {recipe.dataset}{why}", total=recipe.epochs,
                                      unit="epochs")
        for _ in range(recipe.epochs):
            model.train()
            order = train[torch.randperm(len(train), generator=g)]
            for s in range(0, len(order), recipe.batch_size):
                b = order[s:s + recipe.batch_size]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            sched.step()
            task.advance()
        task.close()
        seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    model.eval()
    with torch.no_grad():
        train_acc = (model(x[train]).argmax(1) == y[train]).float().mean().item()
        hold_acc = (model(x[hold]).argmax(1) == y[hold]).float().mean().item()
    return model, {"train_accuracy": train_acc, "holdout_accuracy": hold_acc, "seconds": seconds,
                   "recipe": recipe.key()}


def _digits_backbone_path(name: str, recipe: PretrainRecipe) -> Path:
    return cache_dir() / "backbones" / f"{name}-{recipe.key()}.pt"


def load_pretrained_digits(name: str, recipe: PretrainRecipe = PRETRAIN_RECIPE, *, rebuild: bool = False,
                           progress: Optional[Progress] = None) -> Tuple[nn.Module, Dict[str, float]]:
    """The cached pre-trained digits backbone, pre-training it on first use (or when ``rebuild``; ``progress``
    shows it, epoch by epoch with an ETA)."""
    path = _digits_backbone_path(name, recipe)
    if path.exists() and not rebuild:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = _DIGITS_ARCHS[name](int(blob["num_classes"]))
            model.load_state_dict(blob["state_dict"])
            if state_dict_hash(model.state_dict()) == blob["sha256"]:
                model.eval()
                return model, dict(blob["report"])
        except Exception:
            pass  # corrupt or stale cache: fall through and rebuild it
    why = "" if rebuild else f" (first use; cached in {path.parent})"
    model, report = pretrain_backbone(name, recipe, progress=progress, why=why)
    sd = model.state_dict()
    blob = {"state_dict": sd, "num_classes": model.fc.out_features, "sha256": state_dict_hash(sd), "report": report}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return model, report


# ---------------------------------------------------------------------------------------- loading

def list_models() -> Dict[str, str]:
    return {
        "digits-cnn": "small CNN (3 conv layers), pre-trained by ttp-ray on digits-0to4 (embedded)",
        "digits-resnet": "torchvision ResNet/BasicBlock [1,1,1,1], widths 8-64, BN; pre-trained on digits-0to4 (embedded)",
        "resnet18": "torchvision ResNet-18, IMAGENET1K_V1 weights from the torch hub cache",
        "resnet34": "torchvision ResNet-34, IMAGENET1K_V1 weights from the torch hub cache",
        "resnet50": "torchvision ResNet-50, IMAGENET1K_V1 weights from the torch hub cache",
        "ARCH:PATH": "a state-dict checkpoint for one of the architectures above",
        "package.module:function": "your factory returning an nn.Module (its fc/classifier/head is replaced)",
    }


def _torchvision_imagenet(arch: str, allow_download: bool) -> nn.Module:
    from torchvision import models as tvm

    weights = tvm.get_model_weights(arch).IMAGENET1K_V1
    fname = os.path.basename(weights.url)
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not ckpt.exists() and not allow_download:
        raise ModelError(f"model {arch}: ImageNet weights {fname} not found at {ckpt}; copy the file there "
                         f"(from {weights.url}) or pass --download")
    try:
        return tvm.get_model(arch, weights=weights)
    except Exception as exc:
        raise ModelError(f"model {arch}: cannot load IMAGENET1K_V1 weights: {exc}".splitlines()[0]) from None


def _arch(name: str, num_classes: int = 1000) -> nn.Module:
    if name in _DIGITS_ARCHS:
        return _DIGITS_ARCHS[name](num_classes)
    from torchvision import models as tvm

    return tvm.get_model(name, weights=None, num_classes=num_classes)


def _load_checkpoint(arch: str, path: str) -> nn.Module:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"model {arch}:{path}: checkpoint file does not exist")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"model {arch}:{path}: not a loadable weights-only checkpoint "
                         f"({type(exc).__name__})") from None
    declared = None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        declared = sd.get("input_spec")
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"model {arch}:{path}: checkpoint is not a state dict (name -> tensor)")
    fc_w = next((v for k, v in sd.items() if k.endswith("fc.weight")), None)
    model = _arch(arch, int(fc_w.shape[0]) if fc_w is not None else 1000)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise ModelError(f"model {arch}:{path}: state dict does not fit {arch}: "
                         f"{str(exc).splitlines()[0]}") from None
    if declared is not None:
        model.input_spec = _declared_spec(declared, f"model {arch}:{path}", "the checkpoint's input_spec")
    return model


FACTORY_SEED = 0  # torch's CPU generator while a user factory runs (module docstring)


def load_backbone(name: str, *, allow_download: bool = False) -> nn.Module:
    """The pre-trained network named ``name`` (module docstring), in eval mode."""
    if name in _DIGITS_ARCHS:
        return load_pretrained_digits(name)[0]
    if name in _TORCHVISION_ARCHS:
        return _torchvision_imagenet(name, allow_download).eval()
    if ":" in name:
        left, right = name.split(":", 1)
        if left in _DIGITS_ARCHS or left in _TORCHVISION_ARCHS:
            return _load_checkpoint(left, right).eval()
        try:
            factory = getattr(importlib.import_module(left), right)
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
            raise ModelError(_one_line(f"model {name}: cannot import factory ({type(exc).__name__}: {exc})")) from None
        if not callable(factory):
            raise ModelError(f"model {name}: {right} is a {type(factory).__name__}, not a function; allowed: a "
                             "function that takes no arguments and returns an nn.Module")
        try:
            with torch.random.fork_rng(devices=[]):  # the same weights in every process (module docstring)
                torch.manual_seed(FACTORY_SEED)
                model = factory()
        except Exception as exc:  # the user's code: one line, no traceback
            raise ModelError(_one_line(f"model {name}: the factory raised {type(exc).__name__}: {exc}; allowed: a "
                                       "function that takes no arguments and returns an nn.Module")) from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model {name}: factory returned {type(model).__name__}, not an nn.Module")
        if getattr(model, "input_spec", None) is None and getattr(factory, "input_spec", None) is not None:
            model.input_spec = factory.input_spec
        return model.eval()
    allowed = ", ".join(list(_DIGITS_ARCHS) + list(_TORCHVISION_ARCHS) + ["ARCH:PATH", "package.module:function"])
    raise ModelError(f"model: unknown name {name!r}; allowed: {allowed}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def is_factory(name: str) -> bool:
    """Whether backbone ``name`` is a user factory ``package.module:function`` (Python code imported and called),
    rather than a known backbone or an ``ARCH:PATH`` checkpoint (weights only)."""
    if ":" not in name:
        return False
    left = name.split(":", 1)[0]
    return left not in _DIGITS_ARCHS and left not in _TORCHVISION_ARCHS


# ------------------------------------------------------------------------------------ input specs

DIGITS_INPUT = InputSpec(channels=1, size=8, mean=(0.5,), std=(0.5,),
                         source="pre-trained by ttp-ray on digits-0to4 (intensities x / 16, normalised to [-1, 1])")


def _declared_spec(value: Any, where: str, what: str) -> InputSpec:
    if isinstance(value, InputSpec):
        return value
    if isinstance(value, dict):
        try:
            return InputSpec.from_mapping(value, source=what)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: {what}: {exc}".splitlines()[0]) from None
    raise ModelError(f"{where}: {what} must be an InputSpec or a mapping, got {type(value).__name__}")


def module_input_spec(module: nn.Module, name: str = "") -> InputSpec:
    """What ``module`` declares as its input (attribute ``input_spec``), else unknown but for the input channels
    of its first ``Conv2d`` (a fact of the weights)."""
    declared = getattr(module, "input_spec", None)
    if declared is not None:
        return _declared_spec(declared, f"model {name or type(module).__name__}", "input_spec attribute")
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return UNKNOWN_INPUT
    return InputSpec(channels=int(conv.in_channels), source="the first convolution's input channels")


def _torchvision_input(arch: str) -> InputSpec:
    """The input of torchvision's ``IMAGENET1K_V1`` weights of ``arch``, read from the transforms they carry."""
    from torchvision import models as tvm

    tf = tvm.get_model_weights(arch).IMAGENET1K_V1.transforms()
    return InputSpec(channels=3, size=int(tf.crop_size[0]), mean=tuple(tf.mean), std=tuple(tf.std),
                     source=f"torchvision {arch} IMAGENET1K_V1 transforms")


def input_spec(name: str, *, allow_download: bool = False) -> InputSpec:
    """The input of backbone ``name`` (module docstring): known without loading weights for the embedded and
    torchvision backbones; a checkpoint or factory is loaded to read what it declares."""
    if name in _DIGITS_ARCHS:
        return DIGITS_INPUT
    if name in _TORCHVISION_ARCHS:
        return _torchvision_input(name)
    return module_input_spec(load_backbone(name, allow_download=allow_download), name)


def load_dataset_for_model(ref: Union[str, ImageDataset], model: str, *, adapt: AdaptOptions = AdaptOptions(),
                           subset: Optional[int] = None, subset_seed: int = 0, download: bool = False
                           ) -> ImageDataset:
    """The dataset ``ref`` as backbone ``model`` takes it: user and paper images adapted to :func:`input_spec`
    (channels, size, values; ``adapt`` overrides), the embedded datasets as they are. A dataset whose channels the
    backbone cannot take is :class:`~ttp_ray.inputs.InputMismatchError`, one line naming both, before any kernel
    work. An :class:`~ttp_ray.data.ImageDataset` passed in is only checked."""
    spec = input_spec(model, allow_download=download)
    target = adapt.target(spec)
    if isinstance(ref, ImageDataset):
        ds, shown, why = ref, ref.name, "a loaded dataset is used as it is"
    else:
        embedded = is_embedded(ref)
        ds = load_dataset(ref, subset=subset, subset_seed=subset_seed, download=download,
                          adapt_to=None if embedded else target)
        shown = str(ref)
        why = ("embedded datasets are used as they are" if embedded else
               "adaptation is off (--no-adapt, or adapt: false in a spec)" if target is None else
               f"adapted to the {adapt.channels} channels asked for" if adapt.channels else "")
    check_channels(ds.image_shape, spec, shown, model, why)
    return ds


# ------------------------------------------------------------------------------- fine-tuning model

def _split_classifier(backbone: nn.Module, name: str = "") -> Tuple[nn.Module, int]:
    """Replace the backbone's classifier by Identity; return (feature extractor, feature dim)."""
    body = copy.deepcopy(backbone)
    for attr in ("fc", "classifier", "head"):
        layer = getattr(body, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(body, attr, nn.Identity())
            return body, layer.in_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            dim = layer[-1].in_features
            layer[-1] = nn.Identity()
            return body, dim
    if isinstance(body, nn.Sequential) and len(body) and isinstance(body[-1], nn.Linear):
        dim = body[-1].in_features
        body[-1] = nn.Identity()
        return body, dim
    raise ModelError(f"model{' ' + name if name else ''}: cannot find a linear classifier (fc/classifier/head) in "
                     f"{type(backbone).__name__} to replace by the new head; allowed: a module whose fc, classifier or "
                     f"head attribute (or last layer, for an nn.Sequential) is an nn.Linear")


class FinetuneModel(nn.Module):
    """Pre-trained feature extractor + new seeded linear head; always in eval mode (BN frozen)."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, head_seed: int = 0) -> None:
        super().__init__()
        self.features = features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = nn.Linear(feature_dim, num_classes)
        self.eval()

    def train(self, mode: bool = True) -> "FinetuneModel":
        # batch-norm statistics frozen in fine-tuning and prediction alike (METHOD.md §1)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_finetune_model(backbone: str, num_classes: int, head_seed: int = 0, *, allow_download: bool = False
                         ) -> FinetuneModel:
    net = load_backbone(backbone, allow_download=allow_download)
    features, dim = _split_classifier(net, backbone)
    return FinetuneModel(features, dim, num_classes, head_seed)


TRAINABLE = ("all", "head")


def check_trainable(trainable: str) -> str:
    """``trainable`` if it names a parameter set of :data:`TRAINABLE`, else ValueError."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable: {trainable!r} is not one of {', '.join(TRAINABLE)}")
    return trainable


def trainable_names(model: nn.Module, trainable: str = "all") -> list:
    check_trainable(trainable)
    names = [n for n, _ in model.named_parameters()]
    return names if trainable == "all" else [n for n in names if n.startswith("head.")]


def functional_model(model: nn.Module, trainable: str = "all"
                     ) -> Tuple[Dict[str, torch.Tensor], Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]]:
    """(params, apply): detached trainable parameters and a pure ``apply(params, x) -> (B, C)``.

    Buffers (BN running statistics) and frozen parameters are closed over, so ``apply`` works under
    ``torch.func`` transforms (vmap, jacrev, vjp, jvp, grad).
    """
    model.eval()
    names = set(trainable_names(model, trainable))
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    frozen.update({n: b for n, b in model.named_buffers()})

    def apply(p: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**frozen, **p}, (x,))

    return params, apply
