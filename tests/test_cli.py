import json

import pytest
import torch

from conftest import run_cli


def test_finetune_json(capsys):
    code, out, err = run_cli(["finetune", "--dataset", "digits-5to9:subset=100", "--model", "digits-cnn", "--lr", "0.05",
                              "--momentum", "0.9", "--batch-size", "32", "--loss", "ce", "--steps", "12",
                              "--eps", "0.01", "--eps", "0.1", "--log-every", "3", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["diverged"] is False and d["batch_size"] == 32 and d["effective_lr"] == pytest.approx(0.5)
    assert d["curve"]["steps"] == [0, 3, 6, 9, 12]
    assert {(r["criterion"], r["eps"]) for r in d["training_times"]} == {("loss", 0.01), ("loss", 0.1), ("error", 0.01), ("error", 0.1)}
    assert d["step_time_s"] > 0


def test_listings(capsys):
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "digits-5to9" in out and "cifar10" in out
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "digits-resnet" in out and "resnet18" in out


BASE = ["finetune", "--dataset", "digits-5to9", "--steps", "2"]


@pytest.mark.parametrize("args,field", [
    (["--dataset", "nope", "--lr", "0.1"], "dataset"),
    (["--model", "nope", "--lr", "0.1"], "model"),
    (["--lr", "0"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--lr", "0.1", "--momentum", "1"], "momentum"),
    (["--lr", "0.1", "--batch-size", "0"], "batch_size"),
    (["--lr", "0.1", "--batch-size", "100000"], "batch_size"),
    (["--lr", "0.1", "--steps", "0"], "steps"),
    (["--lr", "0.1", "--eps", "0"], "eps"),
    (["--lr", "0.1", "--eps", "-0.5"], "eps"),
    (["--lr", "abc"], "--lr"),
])
def test_bad_input_one_line_exit_2(capsys, args, field):
    code, out, err = run_cli(BASE + args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], err
    assert "Traceback" not in err


def test_bad_npz_and_checkpoint(tmp_path, capsys):
    (tmp_path / "x.npz").write_bytes(b"nonsense")
    code, _, err = run_cli(["finetune", "--dataset", f"npz:{tmp_path / 'x.npz'}", "--lr", "0.1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "npz" in err
    torch.save({"a": 1}, tmp_path / "c.pt")
    code, _, err = run_cli(["finetune", "--model", f"digits-cnn:{tmp_path / 'c.pt'}", "--lr", "0.1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "state dict" in err


def _png_folder(root, classes=("a", "b", "c"), per_class=4, size=(20, 16)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_predict_image_folder_with_embedded_backbone(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs")
    code, out, err = run_cli(["predict", "--dataset", f"folder:{root}", "--model", "digits-cnn", "--steps", "5",
                              "--lr", "0.05", "--no-cache", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["n"] == 12 and d["num_classes"] == 3 and not d["diverged"]
    assert "1 x 8 x 8" in d["input"] and "[-1, 1]" in d["input"]
    code, out, err = run_cli(["predict", "--dataset", f"folder:{root}", "--model", "digits-cnn", "--steps", "5",
                              "--lr", "0.05", "--no-cache"], capsys)
    assert code == 0 and "images adapted to the backbone's input: RGB images -> 1 x 8 x 8" in out
    code, out, err = run_cli(["finetune", "--dataset", f"folder:{root}", "--model", "digits-cnn", "--steps", "3",
                              "--lr", "0.05", "--input-size", "12", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["input"].startswith("RGB images -> 1 x 12 x 12")
    code, _, err = run_cli(["finetune", "--dataset", f"folder:{root}", "--steps", "3", "--lr", "0.05", "--no-adapt",
                            "--input-size", "12"], capsys)
    assert code == 2 and err.startswith("error: input_size:") and err.count("\n") == 1


def test_unadaptable_channels_are_one_line_exit_2(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs")
    for cmd in ("predict", "finetune"):
        code, out, err = run_cli([cmd, "--dataset", f"folder:{root}", "--model", "tests.helpers:four_channel_factory",
                                  "--steps", "5", "--lr", "0.05"], capsys)
        assert code == 2 and "Traceback" not in err
        assert err.strip() == (f"error: dataset folder:{root} gives 3 x 224 x 224 images; model "
                               "tests.helpers:four_channel_factory expects 4 channels; only 1 and 3 channels are "
                               "converted into each other")


def test_lr_fraction_in_predict_and_finetune(capsys):
    base = ["--dataset", "digits-5to9:subset=100", "--steps", "5", "--momentum", "0.5", "--json"]
    code, out, err = run_cli(["predict", *base, "--lr-fraction", "0.5"], capsys)
    assert code == 0, err
    p = json.loads(out)
    assert p["lr_fraction"] == 0.5 and p["lr"] == pytest.approx(0.5 * p["max_stable_lr"], rel=1e-12)
    code, out, err = run_cli(["finetune", *base, "--lr-fraction", "0.5"], capsys)
    assert code == 0, err
    f = json.loads(out)
    assert f["lr_fraction"] == 0.5 and f["lr"] == pytest.approx(p["lr"], rel=1e-12)  # the default predictor's limit
    assert f["max_stable_lr"] == pytest.approx(p["max_stable_lr"], rel=1e-12)
    code, out, err = run_cli(["finetune", *base, "--lr", "0.01"], capsys)
    assert code == 0 and json.loads(out)["lr_fraction"] is None and json.loads(out)["lr"] == 0.01
    for cmd in ("predict", "finetune"):
        for extra in ([], ["--lr", "0.1", "--lr-fraction", "0.5"]):
            code, _, err = run_cli([cmd, *base, *extra], capsys)
            assert code == 2 and err.count("\n") == 1 and err.startswith("error: lr: give exactly one of --lr")
        code, _, err = run_cli([cmd, *base, "--lr-fraction", "0"], capsys)
        assert code == 2 and err.startswith("error: lr_fraction: must be > 0")
    code, out, _ = run_cli(["finetune", "--help"], capsys)
    assert "--lr-fraction" in out and "default predictor" in out and "cached on disk" in out
