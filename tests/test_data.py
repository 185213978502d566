import numpy as np
import pytest
import torch

from ttp_ray.data import DatasetError, PAPER_DATASETS, load_dataset, parse_dataset_ref


def test_embedded_digits_splits():
    full, lo, hi = load_dataset("digits"), load_dataset("digits-0to4"), load_dataset("digits-5to9")
    assert (len(full), len(lo), len(hi)) == (1797, 901, 896)
    assert (full.num_classes, lo.num_classes, hi.num_classes) == (10, 5, 5)
    assert hi.x.shape == (896, 1, 8, 8) and hi.x.dtype == torch.float32
    assert set(hi.targets.tolist()) == set(range(5))
    assert float(hi.x.min()) >= -1.0 and float(hi.x.max()) <= 1.0


def test_synthetic_is_seeded_and_parameterised():
    a = load_dataset("synthetic:n=300,classes=6,size=10,channels=3,seed=4")
    b = load_dataset("synthetic:n=300,classes=6,size=10,channels=3,seed=4")
    c = load_dataset("synthetic:n=300,classes=6,size=10,channels=3,seed=5")
    assert a.x.shape == (300, 3, 10, 10) and a.num_classes == 6
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert torch.bincount(a.targets).tolist() == [50] * 6


def test_subset_is_class_balanced_and_seeded():
    ds = load_dataset("digits-5to9")
    s1, s2 = ds.subset(100, seed=1), ds.subset(100, seed=1)
    assert len(s1) == 100 and torch.bincount(s1.targets).tolist() == [20] * 5
    assert torch.equal(s1.x, s2.x)
    assert not torch.equal(ds.subset(100, seed=2).x, s1.x)
    via_name = load_dataset("digits-5to9:subset=100")
    assert len(via_name) == 100
    with pytest.raises(DatasetError, match="subset"):
        ds.subset(5000)


def test_npz_user_data(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(20, 6, 6), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert ds.x.shape == (20, 1, 6, 6) and ds.num_classes == 4 and float(ds.x.max()) <= 1.0
    np.savez(tmp_path / "b.npz", x=np.zeros((5, 3, 4, 4), np.float32), y=np.arange(5))
    assert load_dataset(str(tmp_path / "b.npz")).x.shape == (5, 3, 4, 4)


@pytest.mark.parametrize("content,msg", [
    (None, "does not exist"),
    (b"not a zip file", "cannot read"),
    ("noxy", "must hold arrays 'x' and 'y'"),
])
def test_npz_bad_files(tmp_path, content, msg):
    p = tmp_path / "bad.npz"
    if content == "noxy":
        np.savez(p, a=np.zeros(3))
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(DatasetError, match=msg):
        load_dataset(f"npz:{p}")


def _write_images(root, classes, per_class, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")


def test_image_folder(tmp_path):
    _write_images(tmp_path / "imgs", ["cat", "dog", "eel"], 3)
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=16)
    assert len(ds) == 9 and ds.num_classes == 3
    assert ds.images([0, 4]).shape == (2, 3, 16, 16)
    assert len(ds.fingerprint()) == 32


@pytest.mark.parametrize("name", ["cub200", "mit67", "minc2500"])
def test_paper_imagefolder_layouts(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TTP_RAY_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=f"dataset {name}: files not found under {tmp_path}"):
        load_dataset(name)
    _write_images(tmp_path / name / "train", ["a", "b"], 2)
    ds = load_dataset(name, image_size=8)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.images([1]).shape == (1, 3, 8, 8)


def test_fgvc_aircraft_torchvision_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TTP_RAY_DATA", str(tmp_path))
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    from PIL import Image

    (data / "variants.txt").write_text("707-320\nA300B4\n")
    lines = []
    for i, v in enumerate(["707-320", "A300B4", "A300B4"]):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(data / "images" / f"{i:07d}.jpg")
        lines.append(f"{i:07d} {v}")
    (data / "images_variant_trainval.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("fgvc-aircraft", image_size=8)
    assert len(ds) == 3 and ds.num_classes == 2 and ds.targets.tolist() == [0, 1, 1]
    assert ds.images([2]).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("name", sorted(PAPER_DATASETS))
def test_paper_datasets_absent_give_one_clear_line(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TTP_RAY_DATA", str(tmp_path / "nothing"))
    with pytest.raises(DatasetError) as info:
        load_dataset(name)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and str(tmp_path / "nothing") in msg and "TTP_RAY_DATA" in msg


def test_bad_names_and_options():
    with pytest.raises(DatasetError, match="unknown name 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="unknown option"):
        load_dataset("digits:colour=1")
    with pytest.raises(DatasetError, match="n must be an integer"):
        load_dataset("synthetic:n=ten")
    assert str(parse_dataset_ref("synthetic:n=10,classes=2")) == "synthetic:n=10,classes=2"


# ------------------------------------------------------------------- user images adapted to a backbone

def test_npz_digits_export_reaches_digits_cnn_in_its_training_range(tmp_path):
    from sklearn.datasets import load_digits

    from ttp_ray.models import input_spec, load_dataset_for_model

    d = load_digits()
    keep = d.target >= 5
    x = np.round(d.images[keep] * 255 / 16).astype(np.uint8)  # the 8x8 digits as 8-bit pixels
    np.savez(tmp_path / "digits.npz", x=x, y=d.target[keep] - 5)
    plain = load_dataset(f"npz:{tmp_path / 'digits.npz'}")
    assert float(plain.x.min()) >= 0.0 and float(plain.x.max()) <= 1.0  # without a model: [0, 1] as before
    ds = load_dataset_for_model(f"npz:{tmp_path / 'digits.npz'}", "digits-cnn")
    lo, hi = input_spec("digits-cnn").input_range()
    assert (lo, hi) == (-1.0, 1.0)
    assert ds.x.shape == (896, 1, 8, 8)
    assert float(ds.x.min()) == pytest.approx(lo) and float(ds.x.max()) == pytest.approx(hi)
    assert torch.allclose(ds.x, load_dataset("digits-5to9").x, atol=1e-2)  # as the embedded copy, to 8 bits
    assert "values to [-1, 1]" in ds.meta["input"]


def test_folder_adapted_to_a_grey_8x8_backbone_and_overrides(tmp_path):
    from ttp_ray.inputs import AdaptOptions
    from ttp_ray.models import load_dataset_for_model

    _write_images(tmp_path / "imgs", ["a", "b"], 2, size=20)
    ref = f"folder:{tmp_path / 'imgs'}"
    ds = load_dataset_for_model(ref, "digits-cnn")
    assert ds.image_shape == (1, 8, 8) and float(ds.x.min()) >= -1.0 and float(ds.x.max()) <= 1.0
    assert ds.fingerprint() != load_dataset(ref).fingerprint()  # another pipeline, another kernel cache entry
    assert load_dataset_for_model(ref, "digits-cnn", adapt=AdaptOptions(size=12)).image_shape == (1, 12, 12)
    assert load_dataset(ref).image_shape == (3, 224, 224)  # no model: as before
    # a backbone whose input is the loader's default keeps the default fingerprint (and its kernel caches)
    assert load_dataset_for_model(ref, "resnet18").fingerprint() == load_dataset(ref).fingerprint()


def test_channels_that_cannot_be_adapted_are_one_line(tmp_path):
    from ttp_ray.inputs import AdaptOptions, InputMismatchError
    from ttp_ray.models import load_dataset_for_model

    _write_images(tmp_path / "imgs", ["a", "b"], 2)
    ref = f"folder:{tmp_path / 'imgs'}"
    with pytest.raises(InputMismatchError) as info:
        load_dataset_for_model(ref, "tests.helpers:four_channel_factory")
    assert str(info.value).startswith(f"dataset {ref} gives 3 x 224 x 224 images; "
                                      "model tests.helpers:four_channel_factory expects 4 channels")
    assert "\n" not in str(info.value)
    with pytest.raises(InputMismatchError, match="adaptation is off"):
        load_dataset_for_model(ref, "digits-cnn", adapt=AdaptOptions(adapt=False))
    with pytest.raises(InputMismatchError, match="embedded datasets are used as they are"):
        load_dataset_for_model("synthetic:n=20,classes=2,channels=3", "digits-cnn")
    with pytest.raises(ValueError, match="input_size"):
        AdaptOptions(adapt=False, size=8)
