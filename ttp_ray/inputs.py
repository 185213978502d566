"""What a backbone takes as input (:class:`InputSpec`), and user images brought to it.

Following torchvision's convention that weights carry their transforms, every backbone declares its input
(:func:`ttp_ray.models.input_spec`): channels, square size, the intensity range its pixels are scaled to, and the
per-channel normalisation ``(v - mean) / std`` applied after that. A field left ``None`` is unknown, and that
aspect of the data is used as it is.

User images (``npz:``, ``folder:`` and the paper datasets; never the embedded ``digits*`` / ``synthetic``) are
brought to a backbone's input when loaded for it (:func:`ttp_ray.models.load_dataset_for_model`):

* **channels**: RGB -> grey by luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, as PIL and torchvision),
  grey -> RGB by repeating the channel; other counts cannot be converted (:class:`InputMismatchError`);
* **size**: the shorter side resized to ``size`` (bilinear, antialiased), then a centre crop ``size x size``;
* **values**: intensities in [0, 1] (8-bit pixels / 255) scaled to ``value_range``, then normalised by
  ``mean`` / ``std``.

:class:`AdaptOptions` carries the user's overrides (``--input-size``, ``--input-channels``, ``--no-adapt`` in the
CLI; ``input_size``, ``input_channels``, ``adapt`` on a sweep's dataset entry). Torch and torchvision only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "InputSpec",
    "UNKNOWN_INPUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMINANCE",
    "AdaptOptions",
    "InputMismatchError",
    "convert_channels",
    "resize_square",
    "adapt_images",
    "image_pipeline",
    "check_channels",
    "shape_text",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B
CONVERTIBLE_CHANNELS = (1, 3)  # converted into each other; other counts only pass when they already match


class InputMismatchError(ValueError):
    """Images a backbone cannot take and that cannot be adapted to it; the message is one line naming both."""


def _floats(value: Any, name: str) -> Optional[Tuple[float, ...]]:
    if value is None:
        return None
    items = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if not items:
        raise ValueError(f"{name}: must not be empty")
    return items


@dataclass(frozen=True)
class InputSpec:
    """A backbone's input: ``channels`` x ``size`` x ``size`` images whose [0, 1] intensities are scaled to
    ``value_range`` and then normalised per channel by ``mean`` / ``std``. ``None``: unknown (used as it is)."""

    channels: Optional[int] = None
    size: Optional[int] = None  # square side H = W
    mean: Optional[Tuple[float, ...]] = None  # per channel (one value: every channel)
    std: Optional[Tuple[float, ...]] = None
    value_range: Tuple[float, float] = (0.0, 1.0)  # what [0, 1] intensities are scaled to before normalising
    source: str = field(default="", compare=False)  # where the spec comes from, in words

    def __post_init__(self):
        for name in ("channels", "size"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"input {name}: must be a positive integer or unknown, got {v!r}")
        object.__setattr__(self, "mean", _floats(self.mean, "input mean"))
        object.__setattr__(self, "std", _floats(self.std, "input std"))
        if (self.mean is None) != (self.std is None):
            raise ValueError("input mean, std: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"input std: every value must be > 0, got {list(self.std)}")
        lo, hi = (float(v) for v in self.value_range)
        if not lo < hi:
            raise ValueError(f"input value_range: must be [low, high] with low < high, got {list(self.value_range)}")
        object.__setattr__(self, "value_range", (lo, hi))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], source: str = "declared") -> "InputSpec":
        """An :class:`InputSpec` from a mapping with keys among channels, size, mean, std, value_range."""
        allowed = ("channels", "size", "mean", "std", "value_range")
        bad = sorted(set(m) - set(allowed))
        if bad:
            raise ValueError(f"input spec: unknown key {bad[0]!r}; allowed: {', '.join(allowed)}")
        return cls(**{k: m[k] for k in allowed if k in m}, source=source)

    @property
    def known(self) -> bool:
        return self.channels is not None or self.size is not None or self.mean is not None

    @property
    def normalised(self) -> bool:
        """Whether the values the backbone wants are known (else intensities are passed as loaded)."""
        return self.mean is not None or self.value_range != (0.0, 1.0)

    def stats(self, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """``(mean, std)`` for ``channels`` channels (ImageNet's when unknown; a grey image takes the luminance
        average of three-channel statistics, a single value applies to every channel)."""
        mean, std = (self.mean, self.std) if self.mean is not None else (IMAGENET_MEAN, IMAGENET_STD)
        if len(mean) == channels:
            return mean, std
        if len(mean) == 1:
            return mean * channels, std * channels
        if channels == 1 and len(mean) == 3:
            return (sum(w * m for w, m in zip(LUMINANCE, mean)),), (sum(w * s for w, s in zip(LUMINANCE, std)),)
        raise ValueError(f"input mean: {len(mean)} values do not fit {channels} channels")

    def input_range(self) -> Optional[Tuple[float, float]]:
        """The range of values the backbone sees (over its channels), when the normalisation is known."""
        if self.mean is None:
            return self.value_range if self.value_range != (0.0, 1.0) else None
        lo, hi = self.value_range
        ends = [(v - m) / s for m, s in zip(self.mean, self.std) for v in (lo, hi)]
        return min(ends), max(ends)

    def describe(self) -> str:
        """One phrase: ``1 x 8 x 8, values in [-1, 1]``; unknown parts say so."""
        c = "?" if self.channels is None else str(self.channels)
        s = "?" if self.size is None else str(self.size)
        r = self.input_range()
        values = "values as loaded" if r is None else f"values in [{r[0]:.3g}, {r[1]:.3g}]"
        return f"{c} x {s} x {s}, {values}"


UNKNOWN_INPUT = InputSpec(source="unknown")


@dataclass(frozen=True)
class AdaptOptions:
    """How user images are brought to a backbone's input: ``adapt`` off uses them as loaded; ``size`` /
    ``channels`` override the backbone's (e.g. a smaller size for speed, channels for a model that declares none)."""

    adapt: bool = True
    size: Optional[int] = None
    channels: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.adapt, bool):
            raise ValueError(f"adapt: must be true or false, got {self.adapt!r}")
        for name in ("size", "channels"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"input_{name}: must be a positive integer, got {v!r}")
        if not self.adapt and (self.size is not None or self.channels is not None):
            given = "input_size" if self.size is not None else "input_channels"
            raise ValueError(f"{given}: sets what images are adapted to, cannot be combined with adapt off "
                             "(--no-adapt); allowed: one of them")

    @property
    def is_default(self) -> bool:
        return self == AdaptOptions()

    def target(self, spec: InputSpec) -> Optional[InputSpec]:
        """What images are adapted to for a backbone of input ``spec`` (None: adaptation off)."""
        if not self.adapt:
            return None
        return replace(spec, size=self.size or spec.size, channels=self.channels or spec.channels)

    def tag(self) -> str:
        """A short text of the non-default options (``adapt=off``, ``size=32,channels=3``); '' for the defaults."""
        if not self.adapt:
            return "adapt=off"
        return ",".join(f"{k}={v}" for k, v in (("size", self.size), ("channels", self.channels)) if v is not None)


def shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(v)) for v in shape)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, c, H, W)`` images with ``channels`` channels: RGB -> grey by luminance, grey -> RGB by repeating;
    unchanged when ``c`` already equals ``channels`` or the pair is not convertible."""
    c = x.shape[1]
    if c == channels or c not in CONVERTIBLE_CHANNELS or channels not in CONVERTIBLE_CHANNELS:
        return x
    if channels == 1:
        w = torch.tensor(LUMINANCE, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.repeat(1, 3, 1, 1)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, c, H, W)`` images with the shorter side resized to ``size`` (bilinear, antialiased), then centre-cropped
    to ``size x size`` (the folder loader's Resize + CenterCrop, on tensors)."""
    from torchvision.transforms import functional as TF

    if tuple(x.shape[-2:]) == (size, size):
        return x
    return TF.center_crop(TF.resize(x, size, antialias=True), [size, size])


def adapt_images(x: torch.Tensor, target: InputSpec, *, intensities: bool = True) -> torch.Tensor:
    """In-memory images ``(B, c, H, W)`` brought to ``target``: channels, size, then, when ``intensities`` (values
    in [0, 1]) and the target's values are known, scaled to its ``value_range`` and normalised."""
    if target.channels is not None:
        x = convert_channels(x, target.channels)
    if target.size is not None:
        x = resize_square(x, target.size)
    if intensities and target.normalised:
        lo, hi = target.value_range
        x = lo + x * (hi - lo)
        if target.mean is not None:
            mean, std = target.stats(x.shape[1])
            x = (x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.contiguous()


class _ScaleRange:
    """[0, 1] intensities -> [lo, hi] (a transform step; a class, not a lambda, so that it pickles)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.lo + x * (self.hi - self.lo)

    def __repr__(self) -> str:
        return f"ScaleRange({self.lo:g}, {self.hi:g})"


def image_pipeline(target: Optional[InputSpec], default_size: int) -> Tuple[Any, str]:
    """``(transform, key)`` for decoded RGB images (PIL): Resize + CenterCrop to the target's size (else
    ``default_size``), grey when the target has one channel, ToTensor, the target's value range and normalisation
    (ImageNet's when unknown). ``key`` identifies the pipeline for fingerprints; '' when it is the loader's default
    (RGB at ``default_size``, ImageNet-normalised), so default datasets keep their fingerprints."""
    from torchvision import transforms

    t = target or UNKNOWN_INPUT
    size = t.size or default_size
    channels = 1 if t.channels == 1 else 3  # decoded RGB; counts other than 1 and 3 stay RGB (refused later)
    mean, std = t.stats(channels)
    steps = [transforms.Resize(size), transforms.CenterCrop(size)]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    if t.value_range != (0.0, 1.0):
        steps.append(_ScaleRange(*t.value_range))
    steps.append(transforms.Normalize(list(mean), list(std)))
    default = (size, channels, tuple(mean), tuple(std), t.value_range) == (
        default_size, 3, IMAGENET_MEAN, IMAGENET_STD, (0.0, 1.0))
    key = "" if default else repr((size, channels, tuple(mean), tuple(std), t.value_range))
    return transforms.Compose(steps), key


def check_channels(image_shape: Sequence[int], spec: InputSpec, dataset: str, model: str, why: str = "") -> None:
    """:class:`InputMismatchError` (one line naming both sides) when images of ``image_shape`` (c, H, W) do not
    have the channels the backbone expects; ``why`` says why they were not adapted."""
    if spec.channels is None or int(image_shape[0]) == spec.channels:
        return
    unit = "channel" if spec.channels == 1 else "channels"
    msg = f"dataset {dataset} gives {shape_text(image_shape)} images; model {model} expects {spec.channels} {unit}"
    if why:
        msg += f"; {why}"
    elif int(image_shape[0]) not in CONVERTIBLE_CHANNELS or spec.channels not in CONVERTIBLE_CHANNELS:
        msg += "; only 1 and 3 channels are converted into each other"
    raise InputMismatchError(msg)
