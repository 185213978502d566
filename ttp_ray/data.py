"""Dataset registry: every dataset is an :class:`ImageDataset` of float32 images, int64 labels and a
class count.

Names understood by :func:`load_dataset`:

* embedded, offline: ``digits`` (scikit-learn's 1797 8x8 digits, 10 classes), ``digits-0to4`` (the
  backbones' pre-training task) and ``digits-5to9`` (new classes, relabelled 0..4); ``synthetic`` with
  parameters, e.g. ``synthetic:n=4000,classes=10,size=8,channels=1,seed=0`` (seeded Gaussian mixture);
* user data: ``npz:PATH`` (arrays ``x`` N x H x W or N x ch x H x W, ``y`` N ints; integer pixels read as
  [0, 255] and scaled to [0, 1]) and ``folder:ROOT`` (torchvision ImageFolder layout, ``ROOT/CLASS/IMAGE``;
  RGB at 224 x 224, ImageNet-normalised);
* the paper's datasets (METHOD.md §8) under ``$TTP_RAY_DATA`` (default ``<cache>/data``): ``cifar10``,
  ``cifar100``, ``fgvc-aircraft``, ``stanford-cars`` through torchvision's loaders, and ``cub200``,
  ``mit67``, ``minc2500`` as ImageFolder trees (layouts in :data:`PAPER_DATASETS`). Files are never
  downloaded unless ``download=True`` is passed (``--download`` in the CLI).

Any name takes ``subset=N0`` (seeded, class-balanced), e.g. ``digits-5to9:subset=200``.

``adapt_to`` (an :class:`~ttp_ray.inputs.InputSpec`, given by :func:`ttp_ray.models.load_dataset_for_model`)
brings user and paper images to a backbone's input instead (channels, size, values: :mod:`ttp_ray.inputs`);
the embedded datasets ignore it and are always loaded as they are.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .inputs import InputSpec, adapt_images, image_pipeline, shape_text
from .paths import cache_dir

__all__ = [
    "ImageDataset",
    "DatasetError",
    "DatasetRef",
    "PAPER_DATASETS",
    "list_datasets",
    "load_dataset",
    "is_embedded",
    "parse_dataset_ref",
    "data_dir",
    "image_transform",
    "balanced_subset_indices",
    "image_folder",
    "check_readable_images",
]


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message is one line naming the dataset and what to do."""


Index = Union[torch.Tensor, slice, Sequence[int]]


@dataclass
class ImageDataset:
    """Images, labels and class count; images are held in memory or read lazily from a source."""

    name: str
    targets: torch.Tensor  # (N,) int64
    num_classes: int
    _images: Optional[torch.Tensor] = None  # (N, ch, H, W) float32, when in memory
    _source: Optional[Callable[[int], torch.Tensor]] = None  # i -> (ch, H, W), when lazy
    _source_id: str = ""  # identifies a lazy source's content for fingerprints
    meta: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def images(self, index: Index) -> torch.Tensor:
        if self._images is not None:
            if isinstance(index, slice):
                return self._images[index]
            return self._images[torch.as_tensor(index, dtype=torch.long)]
        idx = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        return torch.stack([self._source(int(i)) for i in idx])

    @property
    def x(self) -> torch.Tensor:
        """All images in memory (loads a lazy dataset whole)."""
        if self._images is None:
            self._images = self.images(slice(None))
            self._source = None
        return self._images

    @property
    def image_shape(self) -> Tuple[int, ...]:
        return tuple(self.images(slice(0, 1)).shape[1:])

    def fingerprint(self) -> str:
        """Content hash of images and labels (lazy sources: of their file list and sizes)."""
        h = hashlib.sha256()
        h.update(self.targets.numpy().tobytes())
        h.update(str(self.num_classes).encode())
        if self._images is not None:
            h.update(self._images.contiguous().numpy().tobytes())
        else:
            h.update(self._source_id.encode())
        return h.hexdigest()[:32]

    def subset(self, n0: int, seed: int = 0) -> "ImageDataset":
        idx = balanced_subset_indices(self.targets, self.num_classes, n0, seed)
        return self.select(idx, name=f"{self.name}:subset={n0}")

    def select(self, idx: torch.Tensor, name: Optional[str] = None) -> "ImageDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self._images is not None:
            return ImageDataset(name or self.name, self.targets[idx].clone(), self.num_classes,
                                _images=self._images[idx].clone(), meta=dict(self.meta))
        src, ids = self._source, idx.tolist()
        return ImageDataset(name or self.name, self.targets[idx].clone(), self.num_classes,
                            _source=lambda i: src(ids[i]),
                            _source_id=self._source_id + hashlib.sha256(idx.numpy().tobytes()).hexdigest(),
                            meta=dict(self.meta))


def balanced_subset_indices(targets: torch.Tensor, num_classes: int, n0: int, seed: int = 0) -> torch.Tensor:
    """``n0`` indices, as equal per class as the classes allow, drawn with a seeded generator; sorted."""
    n = int(targets.shape[0])
    if not 0 < n0 <= n:
        raise DatasetError(f"subset: must be in 1..{n} for this dataset, got {n0}")
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(targets == c).flatten() for c in range(num_classes)]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    take = [0] * num_classes
    remaining = n0
    # round-robin over classes that still have samples: class-balanced up to class sizes
    while remaining > 0:
        progressed = False
        for c in range(num_classes):
            if remaining and take[c] < len(per_class[c]):
                take[c] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    idx = torch.cat([per_class[c][: take[c]] for c in range(num_classes)])
    return torch.sort(idx).values


# ---------------------------------------------------------------------------------------- references

@dataclass(frozen=True)
class DatasetRef:
    """A parsed dataset name: ``NAME[:key=value,...]`` or ``npz:PATH`` / ``folder:ROOT``."""

    name: str
    params: Tuple[Tuple[str, str], ...] = ()

    @property
    def options(self) -> Dict[str, str]:
        return dict(self.params)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)


def parse_dataset_ref(text: str) -> DatasetRef:
    text = str(text).strip()
    for prefix in ("npz:", "folder:"):
        if text.startswith(prefix):
            rest = text[len(prefix):]
            path, _, opts = rest.partition(",subset=")
            params = (("path", path),) + ((("subset", opts),) if opts else ())
            return DatasetRef(prefix[:-1], params)
    if text.endswith(".npz"):
        return DatasetRef("npz", (("path", text),))
    name, _, opts = text.partition(":")
    params = []
    for part in filter(None, opts.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise DatasetError(f"dataset: cannot parse option {part!r} in {text!r} (expected key=value)")
        params.append((key.strip(), value.strip()))
    return DatasetRef(name.strip(), tuple(params))


def data_dir() -> Path:
    """Where dataset files are read from: ``$TTP_RAY_DATA``, else ``<cache_dir()>/data``."""
    return Path(os.environ.get("TTP_RAY_DATA") or (cache_dir() / "data"))


# ------------------------------------------------------------------------------------------ embedded

def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    d_images, d_target = _sklearn_digits()
    x = torch.tensor(d_images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = (x - 0.5) / 0.5  # centred to [-1, 1]
    return x, torch.tensor(d_target, dtype=torch.long)


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s images (1797, 8, 8) and targets, read from the file scikit-learn ships as
    ``load_digits`` itself reads it, without importing scikit-learn (about a second); its loader otherwise."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _digits_split(lo: int, hi: int, name: str) -> ImageDataset:
    x, y = _digits()
    keep = (y >= lo) & (y <= hi)
    return ImageDataset(name, (y[keep] - lo).clone(), hi - lo + 1, _images=x[keep].clone(),
                        meta={"source": "sklearn.datasets.load_digits"})


def _synthetic(n: int = 1000, classes: int = 10, size: int = 8, channels: int = 1, seed: int = 0,
               noise: float = 1.0) -> ImageDataset:
    """Seeded Gaussian mixture in image form: one smooth random prototype per class plus pixel noise."""
    if n < classes:
        raise DatasetError(f"dataset synthetic: n must be >= classes ({classes}), got {n}")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, channels, max(2, size // 2), max(2, size // 2), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    x = protos[y] + noise * 0.5 * torch.randn(n, channels, size, size, generator=g)
    return ImageDataset(f"synthetic:n={n},classes={classes},size={size},channels={channels},seed={seed}",
                        y.long(), classes, _images=x.float(),
                        meta={"source": "synthetic gaussian mixture"})


def _npz(path: str, adapt_to: Optional[InputSpec] = None) -> ImageDataset:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"dataset npz: file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DatasetError(f"dataset npz: {p} must hold arrays 'x' and 'y' (has {', '.join(z.files) or 'none'})")
            x, y = np.asarray(z["x"]), np.asarray(z["y"])
    except DatasetError:
        raise
    except Exception as exc:  # zip/pickle/format errors: one line, no traceback
        raise DatasetError(f"dataset npz: cannot read {p}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DatasetError(f"dataset npz: {p}: x must be N x H x W or N x ch x H x W and y N labels "
                           f"(got x {x.shape}, y {y.shape})")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DatasetError(f"dataset npz: {p}: y must hold non-negative integer labels")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"dataset npz: {p}: x must hold real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DatasetError(f"dataset npz: {p}: x holds {bad} non-finite value(s) (NaN or inf); allowed: finite "
                               f"numbers")
    xt = torch.tensor(x, dtype=torch.float32)
    integer = np.issubdtype(x.dtype, np.integer)
    if integer:
        xt = xt / 255.0
    meta: Dict[str, object] = {"source": str(p)}
    if adapt_to is not None:
        # integer pixels are intensities; floats are when they lie in [0, 1], else already in the model's scale
        intensities = integer or bool(xt.numel() and xt.min() >= 0 and xt.max() <= 1)
        before = tuple(xt.shape[1:])
        xt = adapt_images(xt, adapt_to, intensities=intensities)
        meta["input"] = _adapted_note(before, tuple(xt.shape[1:]), adapt_to, intensities)
    return ImageDataset(f"npz:{p}", torch.tensor(y, dtype=torch.long), int(y.max()) + 1, _images=xt, meta=meta)


def _adapted_note(before, after, target: InputSpec, values: bool) -> str:
    """What adaptation did, in words (``ds.meta["input"]``)."""
    r = target.input_range()
    vals = f", values to [{r[0]:.3g}, {r[1]:.3g}]" if values and r is not None else ""
    if not values and r is not None:
        vals = ", values kept (not in [0, 1]: taken as already in the model's scale)"
    return f"{shape_text(before)} -> {shape_text(after)}{vals}"


def image_transform(size: int):
    from torchvision import transforms

    # ImageNet normalisation, fixed resize + centre crop, no augmentation (METHOD.md §1)
    return transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def _from_torchvision(name: str, tv_dataset, image_size: int, files_id: str, pipeline_key: str = "",
                      note: str = "") -> ImageDataset:
    """Wrap a torchvision dataset lazily; labels read without decoding images where possible."""
    targets = None
    for attr in ("targets", "_labels", "_samples"):
        v = getattr(tv_dataset, attr, None)
        if v is not None:
            targets = [s[1] for s in v] if attr == "_samples" else list(v)
            break
    if targets is None:
        targets = [tv_dataset[i][1] for i in range(len(tv_dataset))]
    classes = getattr(tv_dataset, "classes", None)
    num_classes = len(classes) if classes else int(max(targets)) + 1
    meta: Dict[str, object] = {"source": type(tv_dataset).__name__, "image_size": image_size}
    if note:
        meta["input"] = note
    return ImageDataset(name, torch.tensor(targets, dtype=torch.long), num_classes,
                        _source=lambda i: tv_dataset[i][0],
                        _source_id=f"{name}|{image_size}|{files_id}" + (f"|{pipeline_key}" if pipeline_key else ""),
                        meta=meta)


def _pipeline_note(target: Optional[InputSpec], image_size: int, key: str) -> str:
    if target is None or not key:
        return ""
    size = target.size or image_size
    r = target.input_range()
    values = f"values in [{r[0]:.3g}, {r[1]:.3g}]" if r is not None else "ImageNet-normalised"
    return f"RGB images -> {1 if target.channels == 1 else 3} x {size} x {size}, {values}"


def _folder(root: str, name: Optional[str] = None, image_size: int = 224,
            adapt_to: Optional[InputSpec] = None) -> ImageDataset:
    from torchvision.datasets import ImageFolder

    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetError(f"dataset {name or 'folder'}: directory {r} does not exist")
    tf, key = image_pipeline(adapt_to, image_size)
    try:
        tv = ImageFolder(str(r), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"dataset {name or 'folder'}: {r}: {exc}".splitlines()[0]) from None
    files_id = hashlib.sha256("\n".join(f"{p}|{os.path.getsize(p)}" for p, _ in tv.samples).encode()).hexdigest()
    return _from_torchvision(name or f"folder:{r}", tv, image_size, files_id, key,
                             _pipeline_note(adapt_to, image_size, key))


# The paper's seven target datasets (supplement Table 2): how each is found under $TTP_RAY_DATA.
_DOWNLOAD_HINT = "or pass --download to `ttp-ray finetune` or `predict` once (a sweep never downloads)"
PAPER_DATASETS: Dict[str, Dict[str, object]] = {
    "cifar10": {"images": 50000, "classes": 10, "loader": "torchvision.datasets.CIFAR10",
                "layout": "cifar-10-batches-py/ (the python version archive, extracted)",
                "get": "https://www.cs.toronto.edu/~kriz/cifar.html, " + _DOWNLOAD_HINT},
    "cifar100": {"images": 50000, "classes": 100, "loader": "torchvision.datasets.CIFAR100",
                 "layout": "cifar-100-python/ (the python version archive, extracted)",
                 "get": "https://www.cs.toronto.edu/~kriz/cifar.html, " + _DOWNLOAD_HINT},
    "fgvc-aircraft": {"images": 6667, "classes": 100, "loader": "torchvision.datasets.FGVCAircraft",
                      "layout": "fgvc-aircraft-2013b/ (split trainval, annotation level variant)",
                      "get": "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, " + _DOWNLOAD_HINT},
    "stanford-cars": {"images": 8144, "classes": 196, "loader": "torchvision.datasets.StanfordCars",
                      "layout": "stanford_cars/ (devkit/, cars_train/ as torchvision expects)",
                      "get": "the Stanford Cars files (torchvision's StanfordCars docs list them); no download"},
    "cub200": {"images": 5994, "classes": 200, "loader": "ImageFolder",
               "layout": "cub200/train/<class>/<image>.jpg (CUB_200_2011 images split by train_test_split.txt)",
               "get": "https://www.vision.caltech.edu/datasets/cub_200_2011/"},
    "mit67": {"images": 5360, "classes": 67, "loader": "ImageFolder",
              "layout": "mit67/train/<class>/<image>.jpg (Indoor67 TrainImages.txt split)",
              "get": "https://web.mit.edu/torralba/www/indoor.html"},
    "minc2500": {"images": 48875, "classes": 23, "loader": "ImageFolder",
                 "layout": "minc2500/train/<class>/<image>.jpg (minc-2500 train1.txt split)",
                 "get": "http://opensurfaces.cs.cornell.edu/publications/minc/"},
}


def _paper_dataset(name: str, download: bool, image_size: int, adapt_to: Optional[InputSpec] = None) -> ImageDataset:
    from torchvision import datasets as tvd

    info = PAPER_DATASETS[name]
    root = data_dir()
    tf, key = image_pipeline(adapt_to, image_size)
    missing = (f"dataset {name}: files not found under {root} (expected {info['layout']}); "
               f"get them from {info['get']} and set TTP_RAY_DATA to their parent directory")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            tv = cls(str(root), train=True, transform=tf, download=download)
        elif name == "fgvc-aircraft":
            tv = tvd.FGVCAircraft(str(root), split="trainval", transform=tf, download=download)
        elif name == "stanford-cars":
            tv = tvd.StanfordCars(str(root), split="train", transform=tf, download=False)
        else:
            sub = root / name / "train"
            if not sub.is_dir():
                raise DatasetError(missing)
            return _folder(str(sub), name=name, image_size=image_size, adapt_to=adapt_to)
    except DatasetError:
        raise
    except (RuntimeError, FileNotFoundError, OSError):
        raise DatasetError(missing) from None
    files_id = f"{root}|{len(tv)}"
    return _from_torchvision(name, tv, image_size, files_id, key, _pipeline_note(adapt_to, image_size, key))


def image_folder(ref: Union[str, DatasetRef]) -> Optional[Path]:
    """The ImageFolder root a dataset reads its images from (``folder:ROOT``, or a paper set kept as an ImageFolder
    tree under :func:`data_dir`), or None for the others."""
    ref = parse_dataset_ref(ref) if isinstance(ref, str) else ref
    if ref.name == "folder":
        return Path(ref.options["path"]).expanduser()
    if ref.name in PAPER_DATASETS and PAPER_DATASETS[ref.name]["loader"] == "ImageFolder":
        return data_dir() / ref.name / "train"
    return None


def check_readable_images(ref: Union[str, DatasetRef]) -> int:
    """Open the header of every image a folder dataset would read (PIL ``verify``, no decoding); returns how many.
    A file PIL cannot open is :class:`DatasetError`, one line naming the first and how many (other datasets: 0)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    shown = ref if isinstance(ref, str) else str(ref)
    root = image_folder(ref)
    if root is None or not root.is_dir():
        return 0  # not a folder set, or missing (load_dataset says which files it expected)
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"dataset {shown}: {root}: {exc}".splitlines()[0]) from None
    bad = []
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... on broken files
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    if bad:
        first, why = bad[0]
        raise DatasetError(" ".join(f"dataset {shown}: {len(bad)} of {len(samples)} image(s) cannot be read (first: "
                                    f"{first}: {why}); allowed: image files PIL can open (remove or replace "
                                    f"them)".split()))
    return len(samples)


_EMBEDDED = {
    "digits": lambda: _digits_split(0, 9, "digits"),
    "digits-0to4": lambda: _digits_split(0, 4, "digits-0to4"),
    "digits-5to9": lambda: _digits_split(5, 9, "digits-5to9"),
}


def is_embedded(ref: Union[str, DatasetRef]) -> bool:
    """Whether ``ref`` names an embedded dataset (``digits*``, ``synthetic``): those are never adapted."""
    ref = parse_dataset_ref(ref) if isinstance(ref, str) else ref
    return ref.name in _EMBEDDED or ref.name == "synthetic"


def list_datasets() -> Dict[str, str]:
    """Name -> one-line description, for ``ttp-ray datasets``."""
    out = {
        "digits": "scikit-learn digits, 1797 8x8 images, 10 classes (embedded)",
        "digits-0to4": "digits 0-4, 901 images, 5 classes: the backbones' pre-training task (embedded)",
        "digits-5to9": "digits 5-9 relabelled 0-4, 896 images, 5 classes: new classes (embedded)",
        "synthetic:n=N,classes=C,size=S,channels=K,seed=R": "seeded Gaussian-mixture images (embedded)",
        "npz:PATH": "your arrays: x (N x H x W or N x ch x H x W), y (N ints)",
        "folder:ROOT": "your images in ImageFolder layout ROOT/CLASS/IMAGE",
    }
    for name, info in PAPER_DATASETS.items():
        out[name] = f"{info['images']} images, {info['classes']} classes, {info['loader']} under $TTP_RAY_DATA"
    return out


def load_dataset(ref: Union[str, DatasetRef], *, subset: Optional[int] = None, subset_seed: int = 0,
                 download: bool = False, image_size: int = 224, adapt_to: Optional[InputSpec] = None) -> ImageDataset:
    """Load a dataset by name (see the module docstring); raises :class:`DatasetError` with one line.
    ``adapt_to``: user and paper images brought to that backbone input (the embedded datasets ignore it)."""
    ref = parse_dataset_ref(ref) if isinstance(ref, str) else ref
    opts = ref.options
    if "subset" in opts and subset is None:
        subset = _int_opt(ref, opts, "subset")
    name = ref.name
    if name in _EMBEDDED:
        _no_extra(ref, opts, {"subset"})
        ds = _EMBEDDED[name]()
    elif name == "synthetic":
        allowed = {"n", "classes", "size", "channels", "seed", "subset"}
        _no_extra(ref, opts, allowed)
        kw = {k: _int_opt(ref, opts, k) for k in ("n", "classes", "size", "channels", "seed") if k in opts}
        ds = _synthetic(**kw)
    elif name == "npz":
        ds = _npz(opts["path"], adapt_to)
    elif name == "folder":
        ds = _folder(opts["path"], image_size=image_size, adapt_to=adapt_to)
    elif name in PAPER_DATASETS:
        _no_extra(ref, opts, {"subset"})
        ds = _paper_dataset(name, download, image_size, adapt_to)
    else:
        allowed = ", ".join(list(_EMBEDDED) + ["synthetic", "npz:PATH", "folder:ROOT"] + list(PAPER_DATASETS))
        raise DatasetError(f"dataset: unknown name {ref.name!r}; allowed: {allowed}")
    if subset is not None:
        ds = ds.subset(int(subset), subset_seed)
    return ds


def _int_opt(ref: DatasetRef, opts: Dict[str, str], key: str) -> int:
    try:
        v = int(opts[key])
    except ValueError:
        raise DatasetError(f"dataset {ref.name}: {key} must be an integer, got {opts[key]!r}") from None
    if v < 0 or (key != "seed" and v == 0):
        raise DatasetError(f"dataset {ref.name}: {key} must be positive, got {v}")
    return v


def _no_extra(ref: DatasetRef, opts: Dict[str, str], allowed) -> None:
    extra = set(opts) - set(allowed)
    if extra:
        raise DatasetError(f"dataset {ref.name}: unknown option(s) {', '.join(sorted(extra))}; "
                           f"allowed: {', '.join(sorted(allowed))}")
