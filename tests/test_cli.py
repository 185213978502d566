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
